"""The runtime's video/CLI layer: support SPECs, frame sources, the threaded pipeline, outputs,
``python -m mfnet_runtime segment`` and its PyTorch twin ``python -m mfnet.predict``.

Engines are the tiny calibrated export of ``tests/runtime_fixtures.py`` (48 px, untrained, its
labels vary): the tests check plumbing (frame counts, sizes, orders, errors, memory) and
PyTorch/runtime agreement, not accuracy. Each label comparison first checks that the compared
maps hold several labels and differ from each other, so a swapped class or a reordered frame
would fail it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("onnxruntime")
cv2 = pytest.importorskip("cv2")

from mfnet import predict  # noqa: E402
from mfnet_runtime import Segmenter, cli  # noqa: E402
from mfnet_runtime.errors import RuntimeInputError  # noqa: E402
from mfnet_runtime.overlay import PALETTE, overlay  # noqa: E402
from mfnet_runtime.pipeline import segment_video  # noqa: E402
from mfnet_runtime.spec import SupportSpecError, load_support_spec  # noqa: E402
from mfnet_runtime.video import open_source  # noqa: E402
from tests.runtime_fixtures import assert_labels_vary  # noqa: E402

WIDTH, HEIGHT, FRAMES, FPS = 64, 48, 30, 12.0
RED, GREEN = (220, 30, 30), (30, 200, 40)


def scene(step: int, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    """uint8 [H, W, 3] RGB: grey background, a red and a green square moving with ``step``."""
    frame = np.full((height, width, 3), 90, np.uint8)
    x = 4 + (2 * step) % (width - 20)
    frame[8:24, x : x + 14] = RED
    y = 4 + step % (height - 18)
    frame[y : y + 14, width - 20 : width - 6] = GREEN
    return frame


def square_mask(frame: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    return np.all(frame == colour, axis=-1).astype(np.uint8) * 255  # {0, 255}


@pytest.fixture(scope="module")
def engines(varied_export) -> tuple[Path, Path]:
    """(engine_dir, checkpoint) of the tiny 2-way 1-shot model (session export)."""
    return varied_export(2, 1)[:2]


@pytest.fixture(scope="module")
def segmenter(engines) -> Segmenter:
    return Segmenter.load(engines[0], backend="onnxruntime", device="cpu", precision="fp32")


@pytest.fixture
def spec_dir(tmp_path) -> Path:
    """SPEC folder: classes 'red' and 'green', one shot each, masks {0, 255}."""
    root = tmp_path / "spec"
    for name, colour, step in (("red", RED, 3), ("green", GREEN, 7)):
        (root / name).mkdir(parents=True)
        frame = scene(step)
        Image.fromarray(frame).save(root / name / "shot.png")
        Image.fromarray(square_mask(frame, colour)).save(root / name / "shot.mask.png")
    (root / "classes.txt").write_text("red\ngreen\n")
    return root


@pytest.fixture
def video_file(tmp_path) -> Path:
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (WIDTH, HEIGHT))
    assert writer.isOpened()
    for step in range(FRAMES):
        writer.write(cv2.cvtColor(scene(step), cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def run_cli(engines, spec, source, output, *extra) -> int:
    args = [
        "segment",
        "--engines",
        str(engines[0]),
        "--support",
        str(spec),
        "--input",
        str(source),
        "--backend",
        "onnxruntime",
        "--device",
        "cpu",
        "--no-progress",
    ]
    if output is not None:
        args += ["--output", str(output)]
    return cli.main(args + list(extra))


def read_video(path: Path) -> tuple[list[np.ndarray], float]:
    capture = cv2.VideoCapture(str(path))
    fps, frames = capture.get(cv2.CAP_PROP_FPS), []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    return frames, fps


# ------------------------------------------------------------------------------------ SPEC
def test_folder_and_json_specs_parse_to_the_same_thing(spec_dir, tmp_path) -> None:
    entries = [
        {
            "name": name,
            "shots": [{"image": f"spec/{name}/shot.png", "mask": f"spec/{name}/shot.mask.png"}],
        }
        for name in ("red", "green")
    ]
    (tmp_path / "spec.json").write_text(json.dumps({"classes": entries}))
    from_folder, from_json = load_support_spec(spec_dir), load_support_spec(tmp_path / "spec.json")
    assert list(from_folder) == list(from_json) == ["red", "green"]  # classes.txt order
    for name in from_folder:
        for (image_a, mask_a), (image_b, mask_b) in zip(
            from_folder[name], from_json[name], strict=True
        ):
            assert image_a.dtype == np.uint8 and image_a.shape == (HEIGHT, WIDTH, 3)
            np.testing.assert_array_equal(image_a, image_b)
            np.testing.assert_array_equal(mask_a, mask_b)
            assert set(np.unique(mask_a)) == {0, 1}  # 255 = class became 1
    red_image, red_mask = from_folder["red"][0]
    assert np.all(red_image[red_mask == 1] == RED)


def test_spec_order_without_classes_txt_and_mask_conventions(spec_dir) -> None:
    (spec_dir / "classes.txt").unlink()
    assert list(load_support_spec(spec_dir)) == ["green", "red"]  # sorted folder names
    mask = np.array(Image.open(spec_dir / "red" / "shot.mask.png"))
    three = np.where(mask == 255, 1, 0).astype(np.uint8)
    three[0, :] = 255  # {0, 1, 255}: 255 keeps its meaning, ignore
    Image.fromarray(three).save(spec_dir / "red" / "shot.mask.png")
    loaded = load_support_spec(spec_dir)["red"][0][1]
    np.testing.assert_array_equal(loaded, three)
    (spec_dir / "classes.txt").write_text("# only one\ngreen\n")
    assert list(load_support_spec(spec_dir)) == ["green"]


def _break_missing_mask(root: Path) -> None:
    (root / "red" / "shot.mask.png").unlink()


def _break_empty_class(root: Path) -> None:
    for file in (root / "green").iterdir():
        file.unlink()


def _break_no_classes(root: Path) -> None:
    for name in ("red", "green"):
        for file in (root / name).iterdir():
            file.unlink()
        (root / name).rmdir()
    (root / "classes.txt").unlink()


def _break_size(root: Path) -> None:
    Image.fromarray(np.full((10, 12), 255, np.uint8)).save(root / "red" / "shot.mask.png")


def _break_image(root: Path) -> None:
    (root / "green" / "shot.png").write_bytes(b"not a png at all")


def _break_values(root: Path) -> None:
    Image.fromarray(np.full((HEIGHT, WIDTH), 128, np.uint8)).save(root / "red" / "shot.mask.png")


def _break_empty_mask(root: Path) -> None:
    Image.fromarray(np.zeros((HEIGHT, WIDTH), np.uint8)).save(root / "red" / "shot.mask.png")


def _break_classes_txt(root: Path) -> None:
    (root / "classes.txt").write_text("red\nblue\n")


@pytest.mark.parametrize(
    "breaker, expected",
    [
        (_break_missing_mask, ["red", "shot.png", "has no mask shot.mask.png"]),
        (_break_empty_class, ["green", "holds no image"]),
        (_break_no_classes, ["defines no classes"]),
        (_break_size, ["red", "shot.mask.png", "is 12x10", "shot.png", "is 64x48"]),
        (_break_image, ["green", "shot.png", "cannot be read"]),
        (_break_values, ["red", "shot.mask.png", "{128}", "{0, 255}"]),
        (_break_empty_mask, ["shot.mask.png", "all 0"]),
        (_break_classes_txt, ["classes.txt", "blue"]),
    ],
)
def test_spec_errors_name_the_problem(spec_dir, breaker, expected) -> None:
    breaker(spec_dir)
    with pytest.raises(SupportSpecError) as error:
        load_support_spec(spec_dir)
    for fragment in expected:
        assert fragment in str(error.value)


@pytest.mark.parametrize(
    "payload, expected",
    [
        ({"classes": []}, "defines no classes"),
        ({"kinds": []}, '"classes" list'),
        ({"classes": [{"name": "a", "shots": []}]}, 'non-empty "shots"'),
        ({"classes": [{"name": "a", "shots": [{"image": "x.png"}]}]}, '"image" and "mask"'),
        (
            {"classes": [{"name": "a", "shots": [{"image": "x.png", "mask": "m.png"}]}]},
            "x.png does not exist",
        ),
        (
            {
                "classes": [
                    {
                        "name": "a",
                        "shots": [{"image": "spec/red/shot.png", "mask": "spec/red/shot.mask.png"}],
                    }
                ]
                * 2
            },
            "class 'a' twice",
        ),
    ],
)
def test_json_spec_errors(spec_dir, tmp_path, payload, expected) -> None:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(SupportSpecError) as error:
        load_support_spec(path)
    assert expected in str(error.value)
    with pytest.raises(SupportSpecError, match="does not exist"):
        load_support_spec(tmp_path / "nothing.json")


# ------------------------------------------------------------------------- overlay, sources
@pytest.mark.parametrize("with_cv2", [True, False])
def test_overlay_blends_classes_and_draws_a_legend(monkeypatch, with_cv2) -> None:
    if not with_cv2:
        monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 now fails: PIL legend
    frame = np.full((96, 128, 3), 100, np.uint8)
    labels = np.zeros((96, 128), np.uint8)
    labels[60:90, 10:40], labels[60:90, 80:120] = 1, 2
    plain = overlay(frame, labels, alpha=0.5)
    expected = np.rint((100 + np.array(PALETTE[2], np.float32)) / 2).astype(np.uint8)
    assert np.all(plain[70, 100] == expected)
    assert np.array_equal(plain[labels == 0], frame[labels == 0])
    named = overlay(frame, labels, ("red", "green"), alpha=0.5)
    assert not np.array_equal(named[:20, :40], frame[:20, :40])  # legend top-left
    assert np.array_equal(named[40:, :], plain[40:, :])  # nothing else touched


def test_missing_opencv_names_the_extra(monkeypatch, video_file) -> None:
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(RuntimeInputError, match=r"pip install 'mfnet-runtime\[video\]'"):
        open_source(video_file)


# --------------------------------------------------------------------------------- the CLI
def test_help_explains_every_option(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["segment", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--engines",
        "--support",
        "--input",
        "--output",
        "--backend",
        "--device",
        "--precision",
        "--batch-size",
        "--save-support",
        "--load-support",
        "--max-frames",
        "--progress",
    ):
        assert option in text


def test_cli_video_to_video(engines, spec_dir, video_file, tmp_path, capsys) -> None:
    out = tmp_path / "out.mp4"
    assert run_cli(engines, spec_dir, video_file, out, "--batch-size", "4") == 0
    frames, fps = read_video(out)
    assert len(frames) == FRAMES
    assert frames[0].shape == (HEIGHT, WIDTH, 3)
    assert fps == pytest.approx(FPS, rel=1e-3)
    report = capsys.readouterr().out
    assert f"frames: {FRAMES} " in report and "frames per second: " in report
    assert "backend: onnxruntime" in report


def test_cli_video_to_folder_matches_segment(
    engines, segmenter, spec_dir, video_file, tmp_path
) -> None:
    out = tmp_path / "labels"
    assert run_cli(engines, spec_dir, video_file, out, "--batch-size", "3", "--no-smooth") == 0
    label_files = sorted(p for p in out.glob("*.png") if not p.stem.endswith("_overlay"))
    assert [p.name for p in label_files] == [f"{i:06d}.png" for i in range(FRAMES)]
    assert len(list(out.glob("*_overlay.png"))) == FRAMES
    decoded, _ = read_video(video_file)
    support = segmenter.encode_support(load_support_spec(spec_dir))
    checked = (0, 13, FRAMES - 1)
    rgb = {i: cv2.cvtColor(decoded[i], cv2.COLOR_BGR2RGB) for i in checked}
    expected = {i: segmenter.segment(rgb[i], support) for i in checked}
    assert_labels_vary(list(expected.values()), list(rgb.values()), min_labels=3)
    for index, path in enumerate(label_files):
        image = Image.open(path)
        assert image.mode == "L" and image.size == (WIDTH, HEIGHT)
        labels = np.asarray(image)
        assert labels.max() <= 2
        if index in checked:  # frame order and batching preserved
            np.testing.assert_array_equal(labels, expected[index])


def test_cli_image_folder_and_single_image(engines, segmenter, spec_dir, tmp_path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    sizes = [(64, 48), (40, 56), (100, 30)]
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(scene(5 * i, w, h)).save(folder / f"img{i}.png")
    (folder / "notes.txt").write_text("not an image")
    assert run_cli(engines, spec_dir, folder, tmp_path / "out", "--no-smooth") == 0
    support = segmenter.encode_support(load_support_spec(spec_dir))
    images = [np.asarray(Image.open(folder / f"img{i}.png")) for i in range(len(sizes))]
    expected = [segmenter.segment(image, support) for image in images]
    assert_labels_vary(expected, images, min_labels=3)
    for i, size in enumerate(sizes):  # outputs keep the input's file name, each at its own size
        written = Image.open(tmp_path / "out" / f"img{i}.png")
        assert written.size == size
        np.testing.assert_array_equal(np.asarray(written), expected[i])
    assert run_cli(engines, spec_dir, folder / "img2.png", tmp_path / "one", "--no-smooth") == 0
    written = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert written == ["img2.png", "img2_overlay.png"]
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "one" / "img2.png")), expected[2]
    )


def test_cli_saved_support_gives_the_same_labels(engines, spec_dir, video_file, tmp_path) -> None:
    saved = tmp_path / "support.npz"
    assert (
        run_cli(
            engines,
            spec_dir,
            video_file,
            tmp_path / "a",
            "--save-support",
            str(saved),
            "--max-frames",
            "5",
        )
        == 0
    )
    args = [
        "segment",
        "--engines",
        str(engines[0]),
        "--load-support",
        str(saved),
        "--input",
        str(video_file),
        "--output",
        str(tmp_path / "b"),
        "--max-frames",
        "5",
        "--no-progress",
        "--device",
        "cpu",
    ]
    assert cli.main(args) == 0
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir()) and len(names) == 10
    assert_labels_vary(
        [np.asarray(Image.open(tmp_path / "a" / f"{i:06d}.png")) for i in range(5)], min_labels=3
    )
    for name in names:
        np.testing.assert_array_equal(
            np.asarray(Image.open(tmp_path / "a" / name)),
            np.asarray(Image.open(tmp_path / "b" / name)),
        )


def test_cli_without_torch_and_tqdm(engines, spec_dir, video_file, tmp_path) -> None:
    """The whole command in a process where importing torch, mfnet or tqdm fails: the runtime
    never needs them, and the progress counter falls back to plain stderr lines."""
    code = (
        "import sys; sys.modules['torch'] = sys.modules['mfnet'] = sys.modules['tqdm'] = None; "
        "from mfnet_runtime import cli; sys.exit(cli.main(sys.argv[1:]))"
    )
    args = [
        "segment",
        "--engines",
        str(engines[0]),
        "--support",
        str(spec_dir),
        "--input",
        str(video_file),
        "--output",
        str(tmp_path / "out.avi"),
        "--max-frames",
        "6",
        "--device",
        "cpu",
        "--progress",
    ]
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "frames: 6 " in done.stdout and "frames per second" in done.stdout
    assert "segmenting: 6/6 frames" in done.stderr
    assert len(read_video(tmp_path / "out.avi")[0]) == 6


@pytest.mark.parametrize("case", ["camera", "corrupt", "empty_folder", "bad_spec", "image_out"])
def test_cli_bad_inputs_exit_2_with_one_line(engines, spec_dir, tmp_path, capsys, case) -> None:
    source, output, spec = "57", tmp_path / "out", spec_dir
    expected = "camera 57 could not be opened"
    if case == "corrupt":
        source = tmp_path / "broken.mp4"
        source.write_bytes(np.random.default_rng(0).bytes(4096))
        expected = str(source)
    elif case == "empty_folder":
        source = tmp_path / "nothing"
        source.mkdir()
        expected = "holds no image"
    elif case == "bad_spec":
        source, spec, expected = tmp_path, tmp_path / "missing-spec", "missing-spec does not exist"
    elif case == "image_out":
        Image.fromarray(scene(0)).save(tmp_path / "in.png")
        source, output, expected = tmp_path / "in.png", tmp_path / "out.gif", "unknown output"
    assert run_cli(engines, spec, source, output) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], lines


# ------------------------------------------------------------------------ pipeline behaviour
def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096  # resident pages; Linux page size 4 KiB


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_memory_stays_flat_and_the_queue_bounded(segmenter, spec_dir) -> None:
    support = segmenter.encode_support(load_support_spec(spec_dir))
    produced = [0]
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)  # 230 KB a frame

    def frames():
        while True:
            produced[0] += 1
            yield np.roll(base, produced[0], axis=1)  # a new array every frame

    batch, queue_size, total = 8, 4, 2000
    results = segment_video(segmenter, frames(), support, batch_size=batch, queue_size=queue_size)
    lead, rss = 0, {}
    for result in results:
        lead = max(lead, produced[0] - (result.index + 1))
        if result.index + 1 in (200, total):
            rss[result.index + 1] = _rss_bytes()
        if result.index + 1 == total:
            break
    results.close()
    # Read ahead at most: the queued batches, the batch being built, one blocked in put().
    assert lead <= (queue_size + 3) * batch
    # Keeping every frame would add 2000 x 230 KB = 460 MB; allow allocator noise only.
    assert rss[total] - rss[200] < 40 * 2**20, rss
    assert not any(t.name == "mfnet-decode" and t.is_alive() for t in threading.enumerate())


def test_decode_errors_reach_the_consumer(segmenter, spec_dir) -> None:
    support = segmenter.encode_support(load_support_spec(spec_dir))

    def frames():
        yield scene(0)
        yield np.zeros((4, 4, 3), np.float32)  # prepare_frames refuses float frames

    results = segment_video(segmenter, frames(), support)
    assert next(results).index == 0
    with pytest.raises(RuntimeInputError):
        next(results)


# ------------------------------------------------------------------ the PyTorch twin command
def test_predict_matches_the_runtime(engines, spec_dir, tmp_path, capsys) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(scene(4 * i + 1, 64 + 8 * i, 48)).save(folder / f"{i}.png")
    args = [
        "--checkpoint",
        str(engines[1]),
        "--support",
        str(spec_dir),
        "--input",
        str(folder),
        "--output",
        str(tmp_path / "torch"),
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert predict.main(args) == 0
    assert "frames: 4 " in capsys.readouterr().out
    assert run_cli(engines, spec_dir, folder, tmp_path / "onnx") == 0
    assert_labels_vary(
        [np.asarray(Image.open(tmp_path / "torch" / f"{i}.png")) for i in range(4)], min_labels=3
    )
    for i in range(4):
        torch_labels = np.asarray(Image.open(tmp_path / "torch" / f"{i}.png"))
        onnx_labels = np.asarray(Image.open(tmp_path / "onnx" / f"{i}.png"))
        assert torch_labels.shape == onnx_labels.shape == (48, 64 + 8 * i)
        assert (torch_labels == onnx_labels).mean() >= 0.999


def test_predict_twin_agrees_with_the_runtime_before_the_argmax(
    engines, segmenter, spec_dir
) -> None:
    """Beyond equal label maps: the fitted inputs exactly (the pipeline fits frames for both,
    and that fit is evaluation's ``TestResize``), the prototypes and probabilities as floats."""
    torch = pytest.importorskip("torch")
    from mfnet.checkpoint import model_from_checkpoint
    from mfnet.data.transforms import TestResize
    from mfnet_runtime.images import restore_probabilities

    model, config = model_from_checkpoint(engines[1])
    twin = predict.TorchSegmenter(model, config.data.test_resize, torch.device("cpu"))
    classes = load_support_spec(spec_dir)
    torch_support, onnx_support = twin.encode_support(classes), segmenter.encode_support(classes)
    np.testing.assert_allclose(
        torch_support.cache.prototypes[0].numpy(), onnx_support.prototypes, rtol=1e-4, atol=1e-5
    )
    frames = [scene(2, 64, 48), scene(9, 40, 56), scene(5, 48, 48)]
    evaluation = TestResize(twin.input_size, twin.resize)
    torch_batch = np.stack([evaluation(f, np.zeros(f.shape[:2], np.uint8))[0] for f in frames])
    onnx_batch, onnx_geometry = segmenter.prepare_frames(frames)
    np.testing.assert_array_equal(torch_batch, onnx_batch)  # resize and padding are the same
    with torch.inference_mode():
        query = torch.from_numpy(torch_batch).permute(0, 3, 1, 2).float() / 255.0
        probabilities = torch.softmax(model.decode_query(query, torch_support.cache), 1).numpy()
        _, twin_probabilities = twin.decode_with_probabilities(onnx_batch, torch_support)
    np.testing.assert_array_equal(twin_probabilities, probabilities)
    for i, frame in enumerate(frames):
        height, width = frame.shape[:2]
        assert onnx_geometry[i] == (height, width, *evaluation.resized_shape(height, width))
        np.testing.assert_allclose(
            restore_probabilities(probabilities[i], onnx_geometry[i]),
            segmenter.probabilities(frame, onnx_support),
            rtol=1e-4,
            atol=1e-5,
        )


def test_predict_errors_exit_2(engines, spec_dir, tmp_path, capsys) -> None:
    args = [
        "--checkpoint",
        str(tmp_path / "none.pt"),
        "--support",
        str(spec_dir),
        "--input",
        str(tmp_path),
        "--device",
        "cpu",
    ]
    assert predict.main(args) == 2
    assert capsys.readouterr().err.startswith("error:")
    (spec_dir / "classes.txt").write_text("red\n")  # 1 class for a 2-way checkpoint
    args[1] = str(engines[1])
    assert predict.main(args) == 2
    assert "2-way" in capsys.readouterr().err
