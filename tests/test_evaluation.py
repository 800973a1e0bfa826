"""The evaluation protocol, the training-free baseline, and the two command-line interfaces."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from mfnet import evaluate as evaluate_cli
from mfnet import train as train_cli
from mfnet.config import Config
from mfnet.model.baseline import PrototypeBaseline
from mfnet.model.build import build_mfnet
from mfnet.protocol import run_protocol


def test_baseline_matches_prototypes_on_an_easy_case() -> None:
    """With raw RGB as features, a red and a green square are found exactly."""
    size = 32
    support = torch.zeros(1, 2, 1, 3, size, size)  # [B, N, K, 3, H, W], black background
    masks = torch.zeros(1, 2, 1, size, size, dtype=torch.uint8)
    support[0, 0, 0, 0, 4:12, 4:12] = 1.0  # red square, class 1
    masks[0, 0, 0, 4:12, 4:12] = 1
    support[0, 1, 0, 1, 20:28, 20:28] = 1.0  # green square, class 2
    masks[0, 1, 0, 20:28, 20:28] = 1
    support += 0.05  # keep background features non-zero for the cosine
    query = torch.full((1, 3, size, size), 0.05)
    query[0, 0, 0:10, 20:30] = 1.05  # red -> 1
    query[0, 1, 16:30, 2:12] = 1.05  # green -> 2
    expected = torch.zeros(1, size, size, dtype=torch.long)
    expected[0, 0:10, 20:30] = 1
    expected[0, 16:30, 2:12] = 2
    baseline = PrototypeBaseline(lambda images: images)
    logits = baseline(support, masks, query)
    assert logits.shape == (1, 3, size, size)
    assert torch.equal(logits.argmax(1), expected)


def test_protocol_is_deterministic_and_counts_runs(tiny_config) -> None:
    torch.manual_seed(0)
    model = build_mfnet(tiny_config.model).eval()
    predictors = {"MFNet": model, "baseline": PrototypeBaseline(model.extract_features)}
    first = run_protocol(predictors, tiny_config, torch.device("cpu"), progress=False)
    second = run_protocol(predictors, tiny_config, torch.device("cpu"), progress=False)
    for name in predictors:
        assert len(first[name].runs) == tiny_config.eval.eval_runs
        assert json.dumps(first[name].summary()) == json.dumps(second[name].summary())
        assert 0.0 <= first[name].mean("fbiou") <= 1.0
    other_seed = tiny_config.replace(eval_seed=99)
    third = run_protocol(predictors, other_seed, torch.device("cpu"), progress=False)
    assert json.dumps(third["baseline"].summary()) != json.dumps(first["baseline"].summary())


def test_progress_in_a_log_file_is_whole_lines_and_changes_no_number(tiny_config, capsys) -> None:
    torch.manual_seed(0)
    model = build_mfnet(tiny_config.model).eval()
    quiet = run_protocol({"MFNet": model}, tiny_config, torch.device("cpu"), progress=False)
    capsys.readouterr()
    shown = run_protocol({"MFNet": model}, tiny_config, torch.device("cpu"), progress=True)
    err = capsys.readouterr().err  # captured: not a terminal
    assert "\r" not in err
    assert err.splitlines() == [
        "eval run 1/2: 1/2 (50%)",
        "eval run 1/2: 2/2 (100%)",
        "eval run 2/2: 1/2 (50%)",
        "eval run 2/2: 2/2 (100%)",
    ]
    assert json.dumps(shown["MFNet"].summary()) == json.dumps(quiet["MFNet"].summary())


def test_train_and_evaluate_command_lines(tiny_config, tmp_path, capsys) -> None:
    options = []
    for section in ("model", "data", "train", "eval", "loss"):
        for f in dataclasses.fields(getattr(tiny_config, section)):
            value = getattr(getattr(tiny_config, section), f.name)
            if isinstance(value, bool) or isinstance(value, tuple):
                continue  # presets' values for these are the defaults
            options += ["--" + f.name.replace("_", "-"), str(value)]
    assert train_cli.main(options + ["--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "mIoU*" in printed and "baseline" in printed and "2 runs x 6 episodes" in printed
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(results["results"]) == {"MFNet", "baseline"}
    assert Config.from_dict(results["config"]) == tiny_config

    checkpoint = tmp_path / "run" / "last.pt"
    out = tmp_path / "eval.json"
    code = evaluate_cli.main(
        [
            "--checkpoint",
            str(checkpoint),
            "--eval-runs",
            "1",
            "--eval-episodes",
            "3",
            "--workers",
            "0",
            "--no-baseline",
            "--json",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "1 runs x 3 episodes" in printed and "protocol:" in printed
    assert set(json.loads(out.read_text())["results"]) == {"MFNet"}


def test_evaluate_reports_a_bad_checkpoint(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_text("nope")
    assert evaluate_cli.main(["--checkpoint", str(bad)]) == 2
    assert "could not be read" in capsys.readouterr().err


@pytest.mark.parametrize("module", [train_cli, evaluate_cli])
def test_help_explains_every_option(module, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        module.build_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--eval-runs" in text and "(default:" in text
