"""The torch-free runtime (``runtime/mfnet_runtime``) on ONNX Runtime's CPU provider.

Engines are exported (with torch) from tiny calibrated models whose labels vary (the session
fixture ``varied_export``); the runtime must reproduce the PyTorch model's labels and
probabilities, edit and save support sets, refuse bad inputs with
messages that say what to do, and never import torch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
try:
    import mfnet_runtime  # noqa: F401  (installed with pip install -e ./runtime)
except ImportError:  # a source checkout without the runtime installed
    sys.path.insert(0, str(ROOT / "runtime"))

from mfnet_runtime import EngineError, RuntimeInputError, Segmenter, SupportSet  # noqa: E402
from runtime_fixtures import assert_labels_vary  # noqa: E402

# What backend="auto" picks for an FP32 ONNX export without engines: the CUDA provider where
# onnxruntime-gpu is installed (a GPU machine), else the CPU one.
AUTO_BACKEND = (
    "onnxruntime-cuda"
    if "CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers()
    else "onnxruntime-cpu"
)

from mfnet.checkpoint import model_from_checkpoint  # noqa: E402
from mfnet.data.episodes import synthetic_episodes  # noqa: E402
from mfnet.data.transforms import TestResize  # noqa: E402


@pytest.fixture(scope="session")
def exported(varied_export):
    """(way, shot) -> (engine_dir, checkpoint), exported once per session (conftest). The
    models' labels vary across the image, so label parity is not trivially true."""
    return lambda way, shot=1: varied_export(way, shot)[:2]


@pytest.fixture(scope="session")
def segmenter2(exported) -> Segmenter:
    """2-way engines of a 2-shot model (with A_S, so K = 1 uses the single-shot aggregator)."""
    return Segmenter.load(exported(2, 2)[0], backend="onnxruntime", device="cpu")


def shot(seed: int, size: tuple[int, int] = (48, 48), box=(8, 40, 10, 34)):
    """uint8 [H, W, 3] random image + uint8 {0, 1} mask with a box of object."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    mask = np.zeros(size, np.uint8)
    mask[box[0] : box[1], box[2] : box[3]] = 1
    return image, mask


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float [..., 3, H, W] in [0, 1] -> uint8 [..., H, W, 3]."""
    return (images * 255).round().to(torch.uint8).movedim(-3, -1).numpy()


def scene_frame(seed: int, size: tuple[int, int] = (40, 56)) -> np.ndarray:
    """uint8 [H, W, 3]: a crop of a synthetic query (objects on clutter: its labels vary)."""
    episode = synthetic_episodes(
        fold=0, split="test", way=2, shot=1, num_episodes=1, seed=seed, image_size=64
    )[0]
    return np.ascontiguousarray(to_uint8(episode["query_image"])[: size[0], : size[1]])


# --------------------------------------------------------------------------- torch never loaded
def test_runtime_works_with_torch_blocked(exported, tmp_path) -> None:
    engine_dir, _ = exported(2, 2)
    script = textwrap.dedent(f"""
        import importlib.abc, json, sys
        attempts = []
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "mfnet", "torchvision"):
                    attempts.append(name)
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        sys.modules["torch"] = None
        import numpy as np
        from mfnet_runtime import Segmenter
        segmenter = Segmenter.load({str(engine_dir)!r})
        rng = np.random.default_rng(0)
        image = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
        mask = np.zeros((50, 70), bool); mask[10:40, 20:60] = True
        support = segmenter.encode_support({{"a": [(image, mask)], "b": [(image, ~mask)]}})
        labels = segmenter.segment(image, support)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "mfnet")
                        and sys.modules[m] is not None)
        print(json.dumps({{"shape": list(labels.shape), "dtype": str(labels.dtype),
                          "backend": segmenter.backend_name, "attempts": attempts,
                          "loaded": loaded}}))
    """)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "runtime"), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {
        "shape": [50, 70],
        "dtype": "uint8",
        "backend": AUTO_BACKEND,
        "attempts": [],
        "loaded": [],
    }


# ------------------------------------------------------------------- parity with the PyTorch model
@pytest.mark.parametrize("way, shot_count", [(1, 1), (2, 2), (5, 1)])
def test_labels_and_probabilities_match_pytorch(exported, way, shot_count) -> None:
    engine_dir, checkpoint = exported(way, shot_count)
    model, _ = model_from_checkpoint(checkpoint)
    episodes = synthetic_episodes(
        fold=0, split="test", way=way, shot=shot_count, num_episodes=3, seed=7, image_size=48
    )
    support = episodes[0]
    queries = torch.stack([episodes[i]["query_image"] for i in range(3)])  # [3, 3, 48, 48]
    with torch.no_grad():
        cache = model.encode_support(support["support_images"], support["support_masks"])
        logits = model.decode_query(
            torch.from_numpy(to_uint8(queries)).permute(0, 3, 1, 2).float() / 255, cache
        )
    reference_labels = logits.argmax(1).to(torch.uint8).numpy()
    reference_probabilities = torch.softmax(logits, 1).numpy()

    segmenter = Segmenter.load(engine_dir, backend="onnxruntime", device="cpu")
    images, masks = to_uint8(support["support_images"]), support["support_masks"].numpy()
    classes = {
        f"class{n}": [(images[n, k], masks[n, k]) for k in range(shot_count)] for n in range(way)
    }
    encoded = segmenter.encode_support(classes)
    np.testing.assert_allclose(encoded.prototypes, cache.prototypes[0].numpy(), atol=1e-5)
    frames = list(to_uint8(queries))
    labels = np.stack(segmenter.segment_batch(frames, encoded))
    assert labels.shape == (3, 48, 48) and labels.dtype == np.uint8
    assert_labels_vary(list(reference_labels), frames, min_labels=way + 1)  # a real comparison
    assert (labels == reference_labels).mean() >= 0.999
    probabilities = segmenter.probabilities(frames[1], encoded)
    assert probabilities.shape == (way + 1, 48, 48) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities, reference_probabilities[1], atol=1e-5)


def encode_test_episode(segmenter: Segmenter) -> tuple[dict, SupportSet]:
    """A 2-way 2-shot test episode of fold 0 (48 px) and its support set encoded by the runtime."""
    episode = synthetic_episodes(
        fold=0, split="test", way=2, shot=2, num_episodes=1, seed=3, image_size=48
    )[0]
    images, masks = to_uint8(episode["support_images"]), episode["support_masks"].numpy()
    support = segmenter.encode_support(
        {f"c{n}": [(images[n, k], masks[n, k]) for k in range(2)] for n in range(2)}
    )
    return episode, support


def test_non_square_frame_matches_pytorch_pad_resize(exported) -> None:
    engine_dir, checkpoint = exported(2, 2)
    model, config = model_from_checkpoint(checkpoint)
    assert config.data.test_resize == "pad"
    segmenter = Segmenter.load(engine_dir, backend="onnxruntime", device="cpu")
    episode, support = encode_test_episode(segmenter)
    # a 37 x 61 frame: smooth structure so that the resize matters, plus noise
    rng = np.random.default_rng(5)
    ramp = np.linspace(0, 255, 61)[None, :, None] * np.linspace(0.2, 1, 37)[:, None, None]
    frame = np.clip(ramp + rng.normal(0, 30, (37, 61, 3)), 0, 255).astype(np.uint8)
    padded, _ = TestResize(48, "pad")(frame, np.zeros((37, 61), np.uint8))  # evaluation path
    with torch.no_grad():
        cache = model.encode_support(episode["support_images"], episode["support_masks"])
        logits = model.decode_query(
            torch.from_numpy(padded).permute(2, 0, 1)[None].float() / 255, cache
        )
    content_h, content_w = TestResize(48, "pad").resized_shape(37, 61)
    reference = logits.argmax(1)[0].to(torch.uint8).numpy()[:content_h, :content_w]
    reference = np.asarray(Image.fromarray(reference).resize((61, 37), Image.Resampling.NEAREST))
    labels = segmenter.segment(frame, support)
    assert_labels_vary([reference])
    assert labels.shape == (37, 61)
    assert (labels == reference).mean() >= 0.999
    batch, geometry = segmenter.prepare_frames([frame])
    assert np.array_equal(batch[0], padded) and geometry == [(37, 61, content_h, content_w)]


def test_non_square_frame_matches_pytorch_stretch_resize(exported, tmp_path) -> None:
    """An export whose manifest says ``resize: stretch`` (a checkpoint trained with
    ``test_resize="stretch"``) fits frames as the evaluation's stretch resize does."""
    source, checkpoint = exported(2, 2)
    engines = tmp_path / "engines"
    shutil.copytree(source, engines)
    manifest = json.loads((engines / "manifest.json").read_text())
    manifest["model"]["resize"] = "stretch"
    (engines / "manifest.json").write_text(json.dumps(manifest))
    model, _ = model_from_checkpoint(checkpoint)
    segmenter = Segmenter.load(engines, backend="onnxruntime", device="cpu")
    episode, support = encode_test_episode(segmenter)
    rng = np.random.default_rng(6)
    frames = []
    for height, width in ((37, 61), (70, 30)):
        ramp = (
            np.linspace(0, 255, width)[None, :, None] * np.linspace(0.2, 1, height)[:, None, None]
        )
        frames.append(
            np.clip(ramp + rng.normal(0, 30, (height, width, 3)), 0, 255).astype(np.uint8)
        )
    references = []
    for frame in frames:
        height, width = frame.shape[:2]
        stretched, _ = TestResize(48, "stretch")(frame, np.zeros((height, width), np.uint8))
        batch, geometry = segmenter.prepare_frames([frame])
        np.testing.assert_array_equal(batch[0], stretched)  # the same resize as evaluation
        assert geometry == [(height, width, 48, 48)]
        with torch.no_grad():
            logits = model.decode_query(
                torch.from_numpy(stretched.copy()).permute(2, 0, 1)[None].float() / 255,
                support_cache(model, episode),
            )
        reference = logits.argmax(1)[0].to(torch.uint8).numpy()
        references.append(
            np.asarray(Image.fromarray(reference).resize((width, height), Image.Resampling.NEAREST))
        )
    assert_labels_vary(references, frames)
    for frame, reference in zip(frames, references, strict=True):
        labels = segmenter.segment(frame, support)
        assert labels.shape == frame.shape[:2]
        assert (labels == reference).mean() >= 0.999


def support_cache(model, episode):
    with torch.no_grad():
        return model.encode_support(episode["support_images"], episode["support_masks"])


def test_colour_orders_and_image_kinds_agree(segmenter2, tmp_path) -> None:
    support = segmenter2.encode_support({"a": [shot(0)], "b": [shot(1, box=(2, 20, 2, 20))]})
    frame = scene_frame(9)
    expected = segmenter2.segment(frame, support)
    swapped = segmenter2.segment(np.ascontiguousarray(frame[..., ::-1]), support)  # read as RGB
    assert_labels_vary([expected, swapped])  # so a colour-order slip would show
    assert np.array_equal(
        segmenter2.segment(np.ascontiguousarray(frame[..., ::-1]), support, color="bgr"), expected
    )
    rgba = np.concatenate([frame, np.full((40, 56, 1), 7, np.uint8)], axis=2)
    assert np.array_equal(segmenter2.segment(rgba, support), expected)
    Image.fromarray(frame).save(tmp_path / "frame.png")
    assert np.array_equal(segmenter2.segment(tmp_path / "frame.png", support), expected)
    gray = frame[..., 0]
    assert np.array_equal(
        segmenter2.segment(gray, support),
        segmenter2.segment(np.repeat(gray[..., None], 3, 2), support),
    )
    # EXIF orientation 6 (rotate 90 degrees clockwise) is applied when reading a file
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(frame).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    assert segmenter2.segment(str(tmp_path / "rotated.jpg"), support).shape == (56, 40)
    # a batch larger than the engines' max batch (4) is split; each frame keeps its own size
    frames = [frame, frame[:30], frame[:, :20], frame, frame, frame]
    outputs = segmenter2.segment_batch(frames, support)
    assert [o.shape for o in outputs] == [f.shape[:2] for f in frames]
    assert np.array_equal(outputs[4], expected)


def test_mask_conventions_are_equivalent(segmenter2) -> None:
    image, mask = shot(3)
    ignore = mask.copy()
    ignore[0] = 255  # ignore pixels never count as object
    variants = [mask.astype(bool), mask * 255, ignore, mask[..., None]]
    reference = segmenter2.encode_support({"a": [(image, mask)], "b": [shot(4)]}).prototypes
    for variant in variants:
        encoded = segmenter2.encode_support({"a": [(image, variant)], "b": [shot(4)]})
        np.testing.assert_array_equal(encoded.prototypes, reference)


# ------------------------------------------------------------------------------- support sets
def test_add_shot_encodes_one_shot_and_equals_reencoding(segmenter2, monkeypatch) -> None:
    first = segmenter2.encode_support({"a": [shot(10)], "b": [shot(11)]})
    calls = []
    encoder = segmenter2._backend.run_support_encoder
    monkeypatch.setattr(
        segmenter2._backend,
        "run_support_encoder",
        lambda images, masks: calls.append(len(images)) or encoder(images, masks),
    )
    grown = segmenter2.add_shot(first, "a", *shot(12, box=(0, 30, 0, 30)))
    assert calls == [1]  # the backbone ran on the new shot only
    monkeypatch.undo()
    whole = segmenter2.encode_support(
        {"a": [shot(10), shot(12, box=(0, 30, 0, 30))], "b": [shot(11)]}
    )
    assert grown.shot_counts == whole.shot_counts == (2, 1)
    np.testing.assert_allclose(grown.prototypes, whole.prototypes, atol=1e-6)
    np.testing.assert_array_equal(grown.prototypes[1], first.prototypes[1])  # b untouched
    assert first.shot_counts == (1, 1)  # sets are immutable: add_shot returned a new one
    with pytest.raises(ValueError):
        first.prototypes[0, 0] = 1.0  # read-only arrays


def test_remove_class_then_add_a_class(segmenter2) -> None:
    support = segmenter2.encode_support({"a": [shot(20)], "b": [shot(21), shot(22)]})
    only_b = support.remove_class("a")
    assert only_b.class_names == ("b",)
    np.testing.assert_array_equal(only_b.prototypes, support.prototypes[1:])
    with pytest.raises(RuntimeInputError, match=r"1 support classes .*2-way.*fixed at training"):
        segmenter2.segment(shot(0)[0], only_b)
    with pytest.raises(RuntimeInputError, match="no class 'z'"):
        support.remove_class("z")
    grown = segmenter2.add_shot(only_b, "c", *shot(23))
    assert grown.class_names == ("b", "c") and grown.shot_counts == (2, 1)
    fresh = segmenter2.encode_support({"b": [shot(21), shot(22)], "c": [shot(23)]})
    np.testing.assert_allclose(grown.prototypes, fresh.prototypes, atol=1e-6)
    assert segmenter2.segment(shot(0)[0], grown).shape == (48, 48)


def test_save_load_round_trip_and_foreign_sets(segmenter2, exported, tmp_path) -> None:
    support = segmenter2.encode_support({"cat": [shot(30), shot(31)], "dog": [shot(32)]})
    path = tmp_path / "sets" / "pets.npz"
    support.save(path)
    assert path.is_file() and not list(path.parent.glob(".*tmp"))
    loaded = segmenter2.load_support(path)
    assert loaded.class_names == ("cat", "dog") and loaded.engine_id == segmenter2.engine_id
    for a, b in zip(loaded.shot_features, support.shot_features, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded.prototypes, support.prototypes)
    frame = scene_frame(33)
    assert_labels_vary([segmenter2.segment(frame, support)])
    assert np.array_equal(segmenter2.segment(frame, loaded), segmenter2.segment(frame, support))
    assert segmenter2.add_shot(loaded, "dog", *shot(34)).shot_counts == (2, 2)
    detached = SupportSet.load(path)  # no engine check: any segmenter of these engines takes it
    assert segmenter2.add_shot(detached, "dog", *shot(34)).shot_counts == (2, 2)
    # sets encoded by other engines are refused, on load and on use
    other = Segmenter.load(exported(1)[0], backend="onnxruntime", device="cpu")
    foreign = other.encode_support({"x": [shot(35)]})
    foreign.save(tmp_path / "foreign.npz")
    with pytest.raises(RuntimeInputError, match="encoded by other engines"):
        segmenter2.load_support(tmp_path / "foreign.npz")
    with pytest.raises(RuntimeInputError, match="encoded by other engines"):
        segmenter2.add_shot(SupportSet.load(tmp_path / "foreign.npz"), "x", *shot(36))
    forged = SupportSet(support.class_names, support.shot_features, support.prototypes, "0" * 64)
    with pytest.raises(RuntimeInputError, match="encoded by other engines"):
        segmenter2.segment(frame, forged)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(RuntimeInputError, match="not a readable support set"):
        SupportSet.load(tmp_path / "junk.npz")


def test_segmenter_grows_and_loads_a_support_set_built_from_arrays(segmenter2, tmp_path) -> None:
    """A ``SupportSet`` is data: one rebuilt from plain arrays (no segmenter involved) is grown
    and reloaded by the segmenter exactly like the one it encoded; other engine ids are
    refused by both operations."""
    encoded = segmenter2.encode_support({"a": [shot(40)], "b": [shot(41), shot(42)]})
    rebuilt = SupportSet(
        encoded.class_names,
        [np.array(f) for f in encoded.shot_features],
        np.array(encoded.prototypes),
        segmenter2.engine_id,
    )
    grown = segmenter2.add_shot(rebuilt, "a", *shot(43))
    expected = segmenter2.add_shot(encoded, "a", *shot(43))
    assert grown.shot_counts == expected.shot_counts == (2, 2)
    np.testing.assert_array_equal(grown.prototypes, expected.prototypes)
    np.testing.assert_array_equal(grown.prototypes[1], rebuilt.prototypes[1])  # b untouched
    added = segmenter2.add_shot(rebuilt.remove_class("a"), "c", *shot(44))
    assert added.class_names == ("b", "c") and added.shot_counts == (2, 1)
    path = tmp_path / "rebuilt.npz"
    grown.save(path)
    loaded = segmenter2.load_support(path)
    np.testing.assert_array_equal(loaded.prototypes, grown.prototypes)
    frame = scene_frame(45)
    assert np.array_equal(segmenter2.segment(frame, loaded), segmenter2.segment(frame, grown))
    stranger = SupportSet(rebuilt.class_names, rebuilt.shot_features, rebuilt.prototypes, "f" * 64)
    stranger.save(tmp_path / "stranger.npz")
    with pytest.raises(RuntimeInputError, match="stranger.npz was encoded by other engines"):
        segmenter2.load_support(tmp_path / "stranger.npz")
    with pytest.raises(RuntimeInputError, match="encoded by other engines"):
        segmenter2.add_shot(stranger, "a", *shot(43))
    with pytest.raises(RuntimeInputError, match="expected a SupportSet"):
        segmenter2.add_shot({"a": [shot(43)]}, "a", *shot(43))


# -------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "classes, message",
    [
        (
            lambda: {"a": [shot(0)], "b": [shot(1)], "c": [shot(2)]},
            r"3 support classes .*engines are 2-way: the number of classes is fixed at training",
        ),
        (
            lambda: {"a": [shot(0)], "b": [(shot(1)[0], np.zeros((48, 48), np.uint8))]},
            r"mask of class 'b', shot 0 is empty",
        ),
        (
            lambda: {"a": [shot(0), (shot(1)[0], np.full((48, 48), 0, bool))], "b": [shot(1)]},
            r"mask of class 'a', shot 1 is empty",
        ),
        (
            lambda: {
                "a": [shot(0)],
                "b": [
                    (
                        np.zeros((400, 400, 3), np.uint8),
                        np.pad(np.ones((2, 2), np.uint8), ((100, 298), (50, 348))),
                    )
                ],
            },
            r"class 'b', shot 0 .*vanishes after resizing to the network input 48x48",
        ),
        (
            lambda: {"a": [shot(0)], "b": [(shot(1)[0], np.ones((40, 48), np.uint8))]},
            r"mask of class 'b', shot 0 is 40x48 but its image is 48x48",
        ),
        (
            lambda: {"a": [shot(0)], "b": [(shot(1)[0], shot(1)[1] * 3 + 4)]},
            r"mask of class 'b', shot 0 has values \{4, 7\}",
        ),
        (
            lambda: {"a": [(shot(0)[0].astype(np.uint16) * 257, shot(0)[1])], "b": [shot(1)]},
            r"dtype uint16.*\(image // 257\)\.astype\(np\.uint8\)",
        ),
        (
            lambda: {"a": [(shot(0)[0] / 255.0, shot(0)[1])], "b": [shot(1)]},
            r"dtype float64.*\* 255\)\.round\(\)\.astype\(np\.uint8\)",
        ),
        (lambda: {"a": [], "b": [shot(1)]}, r"class 'a' has no support shot"),
    ],
    ids=["way", "empty", "empty-bool", "vanishes", "size", "values", "uint16", "float", "no-shot"],
)
def test_bad_support_inputs_are_explained(segmenter2, classes, message) -> None:
    with pytest.raises(RuntimeInputError, match=message):
        segmenter2.encode_support(classes())


def test_object_vanishing_at_feature_resolution_is_refused_like_pytorch(exported) -> None:
    engine_dir, checkpoint = exported(2, 2)
    model, _ = model_from_checkpoint(checkpoint)
    segmenter = Segmenter.load(engine_dir, backend="onnxruntime", device="cpu")
    # 6 x 6 features of a 48 x 48 input sample rows/cols 0, 9.4, 18.8, ...: rows 11-17 get no
    # weight, so an object there vanishes although it survives the (identity) image resize
    for box, vanishes in [((12, 17, 12, 17), True), ((9, 11, 9, 11), False)]:
        image, mask = shot(40, box=box)
        images = torch.from_numpy(np.stack([image, image])).permute(0, 3, 1, 2)[:, None] / 255
        masks = torch.from_numpy(np.stack([mask, mask]))[:, None]
        try:
            model.encode_shots(images.float(), masks)
            model_refuses = False
        except ValueError as error:
            model_refuses = "vanishes" in str(error)
        assert model_refuses == vanishes
        if vanishes:
            with pytest.raises(RuntimeInputError, match=r"feature map 6x6"):
                segmenter.encode_support({"a": [(image, mask)], "b": [shot(1)]})
        else:
            segmenter.encode_support({"a": [(image, mask)], "b": [shot(1)]})


def test_bad_frames_and_image_files_are_explained(segmenter2, tmp_path) -> None:
    support = segmenter2.encode_support({"a": [shot(0)], "b": [shot(1)]})
    good = tmp_path / "good.png"
    Image.fromarray(shot(2, size=(64, 64))[0]).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(os.urandom(2000))
    for path in (truncated, garbage):
        with pytest.raises(RuntimeInputError, match=rf"frame 0 file {path} cannot be read"):
            segmenter2.segment(path, support)
        with pytest.raises(
            RuntimeInputError,
            match=rf"support image of class 'a', shot 0 file "
            rf"{path} cannot be read",
        ):
            segmenter2.encode_support({"a": [(path, shot(0)[1])], "b": [shot(1)]})
    with pytest.raises(RuntimeInputError, match="does not exist"):
        segmenter2.segment(tmp_path / "missing.png", support)
    with pytest.raises(RuntimeInputError, match=r"must be \[H, W, 3\]"):
        segmenter2.segment(np.zeros((8, 8, 5), np.uint8), support)
    with pytest.raises(RuntimeInputError, match="color must be 'rgb' or 'bgr'"):
        segmenter2.segment(shot(0)[0], support, color="hsv")
    with pytest.raises(RuntimeInputError, match=r"uint8 \[B, 48, 48, 3\]"):
        segmenter2.decode_prepared(np.zeros((1, 32, 32, 3), np.uint8), support)
    # an empty batch is not an error: empty arrays of the documented shapes
    nothing = np.zeros((0, 48, 48, 3), np.uint8)
    assert segmenter2.decode_prepared(nothing, support).shape == (0, 48, 48)
    labels, probabilities = segmenter2.decode_with_probabilities(nothing, support)
    assert labels.shape == (0, 48, 48) and labels.dtype == np.uint8
    assert probabilities.shape == (0, 3, 48, 48) and probabilities.dtype == np.float32


# ---------------------------------------------------------------------------- engine problems
def test_engine_directory_problems_are_explained(exported, tmp_path) -> None:
    source, _ = exported(2, 2)
    with pytest.raises(EngineError, match=r"manifest.json not found.*python -m mfnet.export onnx"):
        Segmenter.load(tmp_path)
    engines = tmp_path / "engines"
    shutil.copytree(source, engines)
    decoder = engines / "query_decoder.fp32.onnx"
    payload = decoder.read_bytes()
    decoder.write_bytes(payload[: len(payload) // 2])  # truncated
    with pytest.raises(
        EngineError,
        match=r"query_decoder.fp32.onnx does not match its SHA-256"
        r".*python -m mfnet.export onnx",
    ):
        Segmenter.load(engines)
    unverified = Segmenter.load(engines, verify_hashes=False)
    support = unverified.encode_support({"a": [shot(0)], "b": [shot(1)]})  # encoder is intact
    with pytest.raises(EngineError, match=r"cannot load .*query_decoder.fp32.onnx.*corrupt"):
        unverified.segment(shot(2)[0], support)
    decoder.unlink()
    with pytest.raises(EngineError, match="query_decoder.fp32.onnx is missing"):
        Segmenter.load(engines)
    manifest = engines / "manifest.json"
    manifest.write_text("{not json")
    with pytest.raises(EngineError, match="not valid JSON"):
        Segmenter.load(engines)
    manifest.write_text(json.dumps({"schema": "other-v9", "graphs": []}))
    with pytest.raises(EngineError, match="schema 'other-v9'"):
        Segmenter.load(engines)


def test_backend_options_are_checked(exported) -> None:
    engine_dir, _ = exported(2, 2)
    for option in ({"backend": "openvino"}, {"device": "tpu"}, {"precision": "int8"}):
        with pytest.raises(RuntimeInputError, match="unknown"):
            Segmenter.load(engine_dir, **option)
    with pytest.raises(EngineError, match=r"no complete fp16 ONNX graphs.*--precisions fp16"):
        Segmenter.load(engine_dir, precision="fp16")
    with pytest.raises(
        EngineError,
        match=r"no TensorRT engines.*python -m mfnet.export trt "
        r"--onnx-dir .* --precision fp16",
    ):
        Segmenter.load(engine_dir, backend="tensorrt")
    if "CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers():
        with pytest.raises(EngineError, match="device='cuda' was asked.*onnxruntime-gpu"):
            Segmenter.load(engine_dir, device="cuda")
    auto = Segmenter.load(engine_dir)
    assert auto.backend_name == AUTO_BACKEND and auto.precision == "fp32"  # FP32-only export
    assert (auto.way, auto.input_size, auto.max_batch) == (2, 48, 4)
    assert len(auto.engine_id) == 64


# ------------------------------------------------------------------------------------- memory
def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_memory_stays_flat_over_many_calls(segmenter2) -> None:
    support = segmenter2.encode_support({"a": [shot(0)], "b": [shot(1)]})
    frames = [shot(2)[0], shot(3, size=(30, 52))[0]]  # one at the network size, one resized
    for i in range(300):  # warm-up: arenas and caches reach their steady size
        segmenter2.segment(frames[i % 2], support)
    before = _rss_bytes()
    for i in range(3000):
        segmenter2.segment(frames[i % 2], support)
    # Leaking even the smallest per-call buffer (the 48 x 48 x 3 uint8 frame, 6.9 KB) would add
    # 20 MB over 3000 calls; 10 MB leaves room for allocator arenas after a long test session
    # (a 4 MB bound failed once in a full run from arena growth alone).
    assert _rss_bytes() - before < 10 * 1024 * 1024
    # Python-side allocations (numpy arrays included) exactly, free of arena noise: a leak of
    # 2 KB a call would add 800 KB over these 400 calls.
    tracemalloc.start()
    try:
        for i in range(20):
            segmenter2.segment(frames[i % 2], support)
        traced_before = tracemalloc.get_traced_memory()[0]
        for i in range(400):
            segmenter2.segment(frames[i % 2], support)
        growth = tracemalloc.get_traced_memory()[0] - traced_before
    finally:
        tracemalloc.stop()
    assert growth < 200 * 1024, growth
