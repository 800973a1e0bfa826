"""``python -m mfnet_runtime demo`` end to end, and the outputs of ``segment``: file names,
single-image output, refused extensions, smooth upsampling, plain progress lines, the legend.

Engines: the tiny export of ``tests/runtime_fixtures.py`` (48 px) with varied labels, so label
maps differ across the image and comparisons of them mean something.
"""

from __future__ import annotations

import io
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("onnxruntime")

from mfnet_runtime import Segmenter, cli  # noqa: E402
from mfnet_runtime.demo import LOOKS, write_demo  # noqa: E402
from mfnet_runtime.overlay import overlay  # noqa: E402
from mfnet_runtime.progress import Progress  # noqa: E402
from mfnet_runtime.spec import load_support_spec  # noqa: E402


@pytest.fixture(scope="module")
def engines(varied_export) -> Path:
    """The session's 2-way 1-shot export of the calibrated model (its labels vary)."""
    return varied_export(2, 1)[0]


@pytest.fixture(scope="module")
def segmenter(engines) -> Segmenter:
    return Segmenter.load(engines, backend="onnxruntime", device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "demo"
    write_demo(out, frames=12)
    return out


def _segment(engines, support, source, output, *extra) -> int:
    args = [
        "segment",
        "--engines",
        str(engines),
        "--support",
        str(support),
        "--input",
        str(source),
        "--backend",
        "onnxruntime",
        "--device",
        "cpu",
        "--no-progress",
    ]
    return cli.main(args + (["--output", str(output)] if output is not None else []) + list(extra))


def _error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


# ------------------------------------------------------------------------------- the demo
def test_demo_looks_are_the_benchmarks_novel_classes_of_fold_0() -> None:
    """The runtime cannot import mfnet: its copy of the looks must equal the benchmark's."""
    from mfnet.data.synthetic import class_style, novel_classes

    assert sorted(look.class_id for look in LOOKS.values()) == list(novel_classes(0))
    for name, look in LOOKS.items():
        style = class_style(look.class_id)
        assert (style.family, style.frequency, style.orientation) == (
            name,
            look.frequency,
            look.orientation,
        )
        assert style.hue == pytest.approx(look.hue)
        np.testing.assert_allclose(look.colours[0], style.colour_a, atol=1e-6)
        np.testing.assert_allclose(look.colours[1], style.colour_b, atol=1e-6)


def test_demo_command_writes_a_spec_images_and_a_video(tmp_path, capsys) -> None:
    cv2 = pytest.importorskip("cv2")
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--frames", "10"]) == 0
    printed = capsys.readouterr().out
    classes = load_support_spec(out / "support")  # the documented SPEC format
    assert list(classes) == ["dots", "checker"]
    for shots in classes.values():
        image, mask = shots[0]
        assert image.shape == (96, 96, 3) and 0.02 < (mask == 1).mean() < 0.5
    queries = sorted(p.name for p in (out / "images").iterdir())
    assert queries == [f"query{i:02d}.png" for i in range(6)]
    capture = cv2.VideoCapture(str(out / "video.mp4"))
    count = 0
    while capture.read()[0]:
        count += 1
    capture.release()
    assert count == 10
    commands = [line.strip() for line in printed.splitlines() if line.startswith("  python")]
    assert commands[0].startswith("python -m mfnet.export onnx --checkpoint runs/synthetic-cpu/")
    assert "  pip install -e '.[export]'" in printed  # the export is the training package's
    segment = shlex.split(commands[1])[3:]  # after "python -m mfnet_runtime"
    args = cli.build_parser().parse_args(segment)
    assert args.input == str(out / "video.mp4") and args.support == str(out / "support")


def test_demo_is_deterministic_and_varies(tmp_path) -> None:
    a = write_demo(tmp_path / "a", frames=3, use_opencv=False)
    b = write_demo(tmp_path / "b", frames=3, use_opencv=False)
    c = write_demo(tmp_path / "c", frames=3, use_opencv=False, seed=1)
    first = [(a.images / f"query{i:02d}.png").read_bytes() for i in range(6)]
    assert first == [(b.images / f"query{i:02d}.png").read_bytes() for i in range(6)]
    assert first != [(c.images / f"query{i:02d}.png").read_bytes() for i in range(6)]
    frames = [np.asarray(Image.open(a.video / f"frame{i:04d}.png")) for i in range(3)]
    assert not np.array_equal(frames[0], frames[1])  # the objects move


def test_demo_without_opencv_writes_frames_and_says_so(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 now fails
    assert cli.main(["demo", "--out", str(tmp_path / "d"), "--frames", "4"]) == 0
    printed = capsys.readouterr().out
    assert "OpenCV is not installed" in printed and "mfnet-runtime[video]" in printed
    assert len(list((tmp_path / "d" / "video_frames").glob("frame*.png"))) == 4
    assert not (tmp_path / "d" / "video.mp4").exists()
    assert f"--input {tmp_path / 'd' / 'video_frames'}" in printed


def test_demo_refuses_unknown_classes(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["demo", "--out", "x", "--classes", "cats"])
    with pytest.raises(Exception, match="distinct"):
        write_demo("unused", ("dots", "dots"))


def test_demo_flow_end_to_end(engines, demo_dir, tmp_path, capsys) -> None:
    """demo -> segment the video and the images with the printed SPEC (a tiny export)."""
    pytest.importorskip("cv2")
    assert (demo_dir / "video.mp4").is_file()
    assert (
        _segment(engines, demo_dir / "support", demo_dir / "video.mp4", tmp_path / "segmented.mp4")
        == 0
    )
    assert "frames: 12 " in capsys.readouterr().out
    assert (tmp_path / "segmented.mp4").stat().st_size > 0
    assert _segment(engines, demo_dir / "support", demo_dir / "images", tmp_path / "labels") == 0
    names = sorted(p.name for p in (tmp_path / "labels").iterdir())
    assert names == sorted(
        [f"query{i:02d}.png" for i in range(6)] + [f"query{i:02d}_overlay.png" for i in range(6)]
    )
    labels = np.asarray(Image.open(tmp_path / "labels" / "query00.png"))
    assert labels.shape == (144, 192) and set(np.unique(labels)) <= {0, 1, 2}


# ---------------------------------------------------------------------------------- outputs
def test_single_image_to_a_png_path(engines, segmenter, demo_dir, tmp_path) -> None:
    image = demo_dir / "images" / "query01.png"
    out = tmp_path / "nested" / "labels.png"
    assert _segment(engines, demo_dir / "support", image, out, "--no-smooth") == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["labels.png", "labels_overlay.png"]
    support = segmenter.encode_support(load_support_spec(demo_dir / "support"))
    expected = segmenter.segment(str(image), support)
    assert len(np.unique(expected)) > 1  # varied labels: the comparison means something
    np.testing.assert_array_equal(np.asarray(Image.open(out)), expected)


@pytest.mark.parametrize(
    "output, expected",
    [
        ("out.gif", "unknown output extension '.gif'"),
        ("out.jpg", "losslessly"),
        ("out.v2", "unknown output extension"),
    ],
)
def test_unknown_output_extensions_are_errors(
    engines, demo_dir, tmp_path, capsys, output, expected
) -> None:
    image = demo_dir / "images" / "query01.png"
    assert _segment(engines, demo_dir / "support", image, tmp_path / output) == 2
    assert expected in _error(capsys)
    assert not (tmp_path / output).exists()


def test_an_image_path_output_needs_a_single_image(engines, demo_dir, tmp_path, capsys) -> None:
    assert _segment(engines, demo_dir / "support", demo_dir / "images", tmp_path / "o.png") == 2
    assert "is an image file but the input has 6 frames" in _error(capsys)


def test_smooth_labels_are_the_argmax_of_upsampled_probabilities(
    engines, segmenter, demo_dir, tmp_path
) -> None:
    image = demo_dir / "images" / "query00.png"  # 192 x 144, larger than the 48 px input
    support = segmenter.encode_support(load_support_spec(demo_dir / "support"))
    assert _segment(engines, demo_dir / "support", image, tmp_path / "s.png") == 0  # default
    assert _segment(engines, demo_dir / "support", image, tmp_path / "n.png", "--no-smooth") == 0
    smooth = np.asarray(Image.open(tmp_path / "s.png"))
    nearest = np.asarray(Image.open(tmp_path / "n.png"))
    expected = segmenter.probabilities(str(image), support).argmax(0)  # bilinear probabilities
    np.testing.assert_array_equal(smooth, expected)
    np.testing.assert_array_equal(nearest, segmenter.segment(str(image), support))
    assert len(np.unique(nearest)) > 1 and 0 < (smooth != nearest).mean() < 0.2


def test_smooth_leaves_frames_at_network_size_alone(segmenter, demo_dir) -> None:
    support = segmenter.encode_support(load_support_spec(demo_dir / "support"))
    frame = np.asarray(Image.open(demo_dir / "images" / "query00.png").resize((48, 36)))
    batch, geometry = segmenter.prepare_frames([frame])
    labels, probabilities = segmenter.decode_with_probabilities(batch, support)
    np.testing.assert_array_equal(
        segmenter.restore_smooth(probabilities[0], geometry[0]),
        segmenter.restore_labels(labels[0], geometry[0]),
    )


def test_progress_without_a_terminal_writes_whole_lines() -> None:
    stream = io.StringIO()  # not a terminal
    progress = Progress(5, "segmenting", stream=stream)
    for _ in range(5):
        progress.update()
    progress.close()
    text = stream.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert lines[0] == "segmenting: 1/5 frames" and lines[-1] == "segmenting: 5/5 frames"
    endless = io.StringIO()
    progress = Progress(None, "segmenting", stream=endless)
    for _ in range(3):
        progress.update()
    progress.close()  # the final count is written even within the rate limit
    assert endless.getvalue().splitlines()[-1] == "segmenting: 3 frames"


@pytest.mark.parametrize("height, width", [(96, 96), (144, 192), (720, 1280)])
def test_the_legend_scales_with_the_frame(height, width) -> None:
    frame = np.full((height, width, 3), 100, np.uint8)
    drawn = overlay(frame, np.zeros((height, width), np.uint8), ("dots", "checker"))
    rows, cols = np.nonzero((drawn != frame).any(-1))
    box_h, box_w = rows.max() + 1, cols.max() + 1
    # about 30 % at 96 px before the legend scaled; 7.0 % at 96 px with OpenCV 5's glyphs
    assert box_h * box_w <= 0.08 * height * width
    assert box_h >= min(height, width) // 8  # and grows with the frame


def test_the_thread_option_reaches_onnx_runtime(engines, demo_dir, tmp_path, capsys) -> None:
    for threads in (1, 3):
        with Segmenter.load(
            engines, backend="onnxruntime", device="cpu", threads=threads
        ) as loaded:
            support = loaded.encode_support(load_support_spec(demo_dir / "support"))
            loaded.segment(np.zeros((48, 48, 3), np.uint8), support)
            sessions = loaded._backend._sessions
            assert set(sessions) >= {"support_encoder", "query_decoder"}
            assert {s.get_session_options().intra_op_num_threads for s in sessions.values()} == {
                threads
            }
            assert loaded.threads == threads
    assert _segment(engines, demo_dir / "support", demo_dir / "images", None, "--threads", "2") == 0
    assert "threads: 2 (" in capsys.readouterr().out


def test_query_scenes_come_with_their_ground_truth() -> None:
    from mfnet_runtime.demo import query_scene

    rng = np.random.default_rng(5)
    for index in range(3):  # both classes, both, then one of them
        image, truth = query_scene(rng, ("dots", "checker"), index, 72, 96)
        assert image.shape == (72, 96, 3) and truth.shape == (72, 96) and truth.dtype == np.uint8
        shown = set(np.unique(truth).tolist())
        assert shown == ({0, 1, 2} if index != 2 else {0, 1})
        object_pixels = image[truth > 0].astype(float)
        assert object_pixels.std() > 10  # a textured object where the truth says one, not blank
