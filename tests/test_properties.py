"""Property-based checks of the public entry points with inputs that mix valid and invalid
values: images, masks, support shots, support SPECs, manifests, checkpoint configs and
command-line options. The property everywhere: a correct result, or one of the documented
error types (docs/errors.md), and no file that existed before is changed.

Fixed seed (``derandomize``) and a small example budget (profile ``ci``, the default; about
30 s on two busy cores); ``MFNET_HYPOTHESIS_PROFILE=thorough`` runs ten times as many examples.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402
from PIL import Image  # noqa: E402

from fault_fixtures import snapshot, tiny_config, valid_manifest, write_checkpoint  # noqa: E402
from mfnet.checkpoint import CheckpointError, model_from_checkpoint  # noqa: E402
from mfnet.config import Config, ConfigError  # noqa: E402
from mfnet_runtime import cli as runtime_cli  # noqa: E402
from mfnet_runtime.errors import EngineError, RuntimeInputError  # noqa: E402
from mfnet_runtime.images import as_mask_array, prepare_image  # noqa: E402
from mfnet_runtime.manifest import read_manifest  # noqa: E402
from mfnet_runtime.shots import prepare_shot  # noqa: E402
from mfnet_runtime.spec import load_support_spec  # noqa: E402

COMMON = dict(
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
)
settings.register_profile("ci", max_examples=40, **COMMON)
settings.register_profile("thorough", max_examples=400, **COMMON)
settings.load_profile(os.environ.get("MFNET_HYPOTHESIS_PROFILE", "ci"))

SIZE = 32
# JSON-like values, the kind a hand-edited file can hold where a number or string belongs.
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 70),
    st.floats(allow_nan=True),
    st.text(max_size=6),
    st.sampled_from(["2", "fp32", "RGB", "B", "pad"]),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)

DTYPES = st.sampled_from([np.uint8, np.uint8, np.float32, np.int16, np.bool_, np.int64])


def arrays(max_side: int = 12, ndims=(1, 4)):
    """Arrays of any dtype and rank (mostly small), including empty ones."""
    return DTYPES.flatmap(
        lambda dtype: hnp.arrays(
            dtype,
            hnp.array_shapes(min_dims=ndims[0], max_dims=ndims[1], min_side=0, max_side=max_side),
        )
    )


VALID_IMAGES = hnp.arrays(np.uint8, st.tuples(st.integers(1, 40), st.integers(1, 40), st.just(3)))
# About half valid: sampled_from picks the branch, so the odd kinds do not crowd it out.
IMAGES = st.sampled_from(["valid", "other"]).flatmap(
    lambda kind: (
        VALID_IMAGES
        if kind == "valid"
        else st.one_of(
            arrays(),
            st.none(),
            st.integers(),
            st.text(max_size=4),
            st.lists(st.integers(), max_size=3),
        )
    )
)
MASKS = st.one_of(
    hnp.arrays(
        np.uint8,
        st.tuples(st.integers(1, 40), st.integers(1, 40)),
        elements=st.sampled_from([0, 1, 255, 2, 128]),
    ),
    hnp.arrays(np.bool_, st.tuples(st.integers(1, 40), st.integers(1, 40))),
    arrays(),
    st.none(),
    st.text(max_size=4),
)


@given(
    image=IMAGES, mode=st.sampled_from(["pad", "stretch"]), color=st.sampled_from(["rgb", "bgr"])
)
def test_images_become_network_inputs_or_runtime_input_errors(image, mode, color) -> None:
    try:
        fitted, (height, width, content_h, content_w) = prepare_image(image, SIZE, mode, color)
    except RuntimeInputError:
        return
    assert fitted.dtype == np.uint8 and fitted.shape == (SIZE, SIZE, 3)
    assert (height, width) == np.asarray(image).shape[:2]
    assert 1 <= content_h <= SIZE and 1 <= content_w <= SIZE


@given(mask=MASKS)
def test_masks_become_0_1_255_or_runtime_input_errors(mask) -> None:
    try:
        labels = as_mask_array(mask)
    except RuntimeInputError:
        return
    assert labels.dtype == np.uint8 and labels.ndim == 2
    assert set(np.unique(labels)) <= {0, 1, 255}


@given(image=IMAGES, mask=MASKS)
def test_support_shots_are_checked_together(image, mask) -> None:
    try:
        fitted, labels = prepare_shot(image, mask, SIZE, "pad", "small", "rgb", "class 'a', shot 0")
    except RuntimeInputError:
        return
    assert fitted.shape == (SIZE, SIZE, 3) and labels.shape == (SIZE, SIZE)
    assert (labels == 1).any()  # an empty shot is refused, never encoded


@pytest.fixture(scope="module")
def spec_files(tmp_path_factory) -> Path:
    """Two valid shots on disk (image + mask) and a non-image file, shared by the examples."""
    root = tmp_path_factory.mktemp("spec")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        image = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / f"{name}.png")
        mask = np.zeros((20, 24), np.uint8)
        mask[5:15, 4:20] = 1
        Image.fromarray(mask).save(root / f"{name}.mask.png")
    (root / "notes.txt").write_text("not an image")
    return root


FILES = st.sampled_from(
    ["a.png", "b.png", "a.mask.png", "b.mask.png", "notes.txt", "none.png", ".", "../a.png"]
)
SHOTS = st.one_of(st.fixed_dictionaries({"image": FILES, "mask": FILES}), JSON_VALUES)
CLASSES = st.one_of(
    st.fixed_dictionaries(
        {
            "name": st.one_of(st.sampled_from(["cat", "dog", " "]), JSON_SCALARS),
            "shots": st.one_of(st.lists(SHOTS, max_size=3), JSON_VALUES),
        }
    ),
    JSON_VALUES,
)
SPECS = st.one_of(st.fixed_dictionaries({"classes": st.lists(CLASSES, max_size=3)}), JSON_VALUES)


@given(spec=SPECS)
def test_support_specs_load_or_raise_runtime_input_errors(spec_files, spec) -> None:
    path = spec_files / "spec.json"
    path.write_text(json.dumps(spec))
    before = snapshot(spec_files)
    try:
        classes = load_support_spec(path)
    except RuntimeInputError:
        classes = None
    assert snapshot(spec_files) == before
    if classes is None:
        return
    assert list(classes) == [c["name"].strip() for c in spec["classes"]]
    for shots in classes.values():
        for image, mask in shots:
            assert image.shape == (20, 24, 3) and mask.shape == (20, 24) and (mask == 1).any()


def _paths(value, prefix=()):
    """Every key path into a nested manifest."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*prefix, index))


MANIFEST_PATHS = [p for p in _paths(valid_manifest()) if p]
# Half of the changes go to the fields the runtime computes with (sizes, limits, mean / std).
COMPUTED_PATHS = [
    p for p in MANIFEST_PATHS if p[0] == "model" or (len(p) == 4 and p[2] == "details")
]


@st.composite
def manifests(draw):
    """The valid manifest with 0..2 of its fields (mostly one or none) replaced by JSON values
    or removed: with one change, each field's own check is what decides."""
    manifest = valid_manifest()
    for _ in range(draw(st.sampled_from([1, 0, 1, 0, 2]))):
        path = draw(st.sampled_from(COMPUTED_PATHS) | st.sampled_from(MANIFEST_PATHS))
        parent = manifest
        try:
            for key in path[:-1]:
                parent = parent[key]
            if draw(st.booleans()) and isinstance(parent, dict):
                parent.pop(path[-1], None)
            else:
                parent[path[-1]] = draw(JSON_SCALARS | JSON_VALUES)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier change removed the way there
    return manifest


@given(manifest=manifests())
def test_manifests_are_read_or_refused_with_engine_errors(tmp_path_factory, manifest) -> None:
    directory = tmp_path_factory.mktemp("manifest")
    (directory / "manifest.json").write_text(json.dumps(manifest))
    before = snapshot(directory)
    try:
        read = read_manifest(directory)
    except EngineError as error:
        assert "python -m mfnet.export onnx" in str(error)  # the fix is always named
        read = None
    assert snapshot(directory) == before
    if read is None:
        return
    model = read.model
    assert all(
        isinstance(v, int) and v >= 1
        for v in (model.way, model.channels, model.input_size, model.train_shot)
    )
    assert len(model.mean) == 3 and min(model.std) > 0
    for graph in read.graphs:
        for key in ("max_batch", "max_support", "max_shots", "min_shots"):
            value = graph.details.get(key, 1)
            assert isinstance(value, int) and value >= 1  # never a zero step for range()


CONFIG_VALUES = st.one_of(
    st.sampled_from(
        [0, -1, 1, 2, 3, 4, "2", 2.5, None, True, [], {}, "text", "pad", float("nan"), [0.5], 1e-3]
    )
)
CONFIG_FIELDS = [
    (section, name) for section, fields in Config().to_dict().items() for name in fields
]


@st.composite
def configs(draw):
    config = copy.deepcopy(tiny_config())
    for _ in range(draw(st.sampled_from([0, 1, 0, 1, 2]))):
        section, name = draw(st.sampled_from(CONFIG_FIELDS))
        config[section][name] = draw(CONFIG_VALUES)
    return config


@given(config=configs())
def test_configs_build_or_raise_config_errors(config) -> None:
    try:
        built = Config.from_dict(copy.deepcopy(config))
    except ConfigError as error:  # it names the field at fault
        assert any(name in str(error) for _, name in CONFIG_FIELDS), error
        return
    assert built.to_dict() == json.loads(json.dumps(built.to_dict()))  # plain data round trip
    assert Config.from_dict(built.to_dict()) == built


@settings(max_examples=12)
@given(config=configs())
def test_checkpoints_load_or_raise_checkpoint_errors(tmp_path_factory, config) -> None:
    directory = tmp_path_factory.mktemp("checkpoint")
    path = write_checkpoint(directory / "model.pt", config)
    before = snapshot(directory)
    try:
        model, loaded = model_from_checkpoint(path)
    except CheckpointError:
        loaded = None
    assert snapshot(directory) == before
    if loaded is not None:
        assert loaded.to_dict() == Config.from_dict(config).to_dict()
        assert model.way == loaded.model.way


OPTION_TEXT = st.one_of(
    st.sampled_from(["0", "1", "-1", "2", "0.5", "1.5", "nan", "inf", "x", ""]), st.text(max_size=4)
)


@given(batch=OPTION_TEXT, frames=OPTION_TEXT, alpha=OPTION_TEXT, fps=OPTION_TEXT)
def test_runtime_options_parse_in_range_or_exit_2(
    tmp_path_factory, batch, frames, alpha, fps
) -> None:
    parser = runtime_cli.build_parser()
    argv = [
        "segment",
        "--engines",
        "e",
        "--support",
        "s",
        "--input",
        "0",
        f"--batch-size={batch}",
        f"--max-frames={frames}",
        f"--alpha={alpha}",
        f"--fps={fps}",
    ]
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:
        assert stop.code == 2
        return
    assert args.batch_size >= 1 and args.max_frames >= 1
    assert 0 <= args.alpha <= 1 and args.fps > 0 and np.isfinite(args.fps)
