"""Training logs (CSV, TensorBoard, curves) and the Fig. 4-style qualitative grids."""

from __future__ import annotations

import torch
from PIL import Image

from mfnet import evaluate
from mfnet.training.logs import TrainLogger, plot_curves, read_log, write_eval_scalars
from mfnet.training.loop import train
from mfnet.visualize import label_to_rgb, save_visuals


def test_csv_log_keeps_full_precision_and_drops_steps_after_the_resume_point(tmp_path) -> None:
    logger = TrainLogger(tmp_path, tensorboard=False)
    for step in range(1, 5):
        logger.step(step, 1, step / 3, 0.05 * step, None if step < 3 else 0.3, 0.01)
    logger.close()
    rows = read_log(tmp_path / "log.csv")
    assert [float(r["loss"]) for r in rows] == [s / 3 for s in range(1, 5)]  # repr: exact
    assert rows[0]["pml"] == "" and float(rows[3]["pml"]) == 0.3
    resumed = TrainLogger(tmp_path, resume_step=2, tensorboard=False)  # steps 3-4 were lost
    resumed.step(3, 1, 9.0, 9.0, 9.0, 0.01)
    resumed.close()
    assert [(r["step"], r["loss"]) for r in read_log(tmp_path / "log.csv")] == [
        ("1", rows[0]["loss"]),
        ("2", rows[1]["loss"]),
        ("3", "9.0"),
    ]
    assert TrainLogger(tmp_path / "other", enabled=False).enabled is False
    assert not (tmp_path / "other").exists()  # ranks other than 0 write nothing
    png = plot_curves(tmp_path / "log.csv", tmp_path / "curves.png")
    assert Image.open(png).size[0] > 100


def test_training_writes_logs_tensorboard_curves_and_evaluation_visuals(
    tiny_config, tmp_path
) -> None:
    model, checkpoint = train(tiny_config, progress=False)
    out = checkpoint.parent
    rows = read_log(out / "log.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(float(r["lr"]) > 0 for r in rows)
    assert (out / "curves.png").stat().st_size > 0
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    results = evaluate.evaluate_model(model, tiny_config, torch.device("cpu"), progress=False)
    write_eval_scalars(out, 4, results)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for path in (out / "tensorboard").glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(path))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert {
        "train/loss",
        "train/seg",
        "train/pml",
        "train/lr",
        "eval/MFNet/mIoU*",
        "eval/MFNet/mIoU",
        "eval/MFNet/FB-IoU",
        "eval/baseline/mIoU*",
    } <= tags
    assert any(tag.startswith("eval/MFNet/IoU*_class") for tag in tags)

    paths = save_visuals(model, tiny_config, torch.device("cpu"), tmp_path / "visuals", 2)
    width, height = Image.open(paths[0]).size
    assert width > height > 0  # two rows of five panels and a legend
    assert (
        evaluate.main(
            [
                "--checkpoint",
                str(checkpoint),
                "--save-visuals",
                str(tmp_path / "cli"),
                "--num-visuals",
                "3",
                "--no-baseline",
                "--no-progress",
                "--eval-runs",
                "1",
                "--eval-episodes",
                "3",
            ]
        )
        == 0
    )
    assert (tmp_path / "cli" / "fold0.png").is_file()


def test_label_colours() -> None:
    rgb = label_to_rgb(torch.tensor([[0, 1], [2, 255]]))
    assert rgb.shape == (2, 2, 3)
    assert rgb[0, 0].sum() == 0 and rgb[0, 1].sum() > 0 and not torch.equal(rgb[0, 1], rgb[1, 0])
    assert torch.allclose(rgb[1, 1], torch.tensor([0.5, 0.5, 0.5]))
