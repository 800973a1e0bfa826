"""What a new user meets first: resume that cannot overwrite, --print-config, help that shows
the preset's defaults, the PML warning of short runs, and every command of the READMEs."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mfnet import evaluate as evaluate_cli
from mfnet import train as train_cli
from mfnet.checkpoint import load_checkpoint
from mfnet.config import preset
from mfnet.training.logs import read_log

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--image-size",
    "48",
    "--channels",
    "16",
    "--epochs",
    "1",
    "--episodes-per-epoch",
    "8",
    "--batch-size",
    "4",
    "--workers",
    "0",
    "--no-evaluate",
    "--no-progress",
]


def _error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture
def trained(tmp_path, monkeypatch, capsys) -> Path:
    """A one-epoch tiny run in tmp_path/run, the working directory being tmp_path/cwd."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = tmp_path / "run"
    assert train_cli.main([*TINY, "--out", str(out)]) == 0
    capsys.readouterr()
    return out


def test_a_new_run_refuses_a_folder_holding_a_checkpoint(trained, capsys) -> None:
    before = (trained / "last.pt").read_bytes()
    assert train_cli.main([*TINY, "--out", str(trained)]) == 2
    line = _error(capsys)
    assert "already holds a checkpoint" in line and "--overwrite" in line and "--resume" in line
    assert (trained / "last.pt").read_bytes() == before  # untouched
    assert train_cli.main([*TINY, "--out", str(trained), "--overwrite", "--seed", "3"]) == 0
    assert (trained / "last.pt").read_bytes() != before


def test_resume_takes_the_configuration_and_folder_from_the_checkpoint(trained, capsys) -> None:
    checkpoint = trained / "last.pt"
    assert len(read_log(trained / "log.csv")) == 2
    # only the run length (and other free options) given: the rest comes from the checkpoint
    assert (
        train_cli.main(
            ["--resume", str(checkpoint), "--epochs", "2", "--no-evaluate", "--no-progress"]
        )
        == 0
    )
    assert not Path("runs").exists()  # nothing went to the preset's default folder
    payload = load_checkpoint(checkpoint)
    assert payload["epoch"] == 2 and payload["config"]["model"]["image_size"] == 48
    assert payload["config"]["train"]["out"] == str(trained)
    assert [row["epoch"] for row in read_log(trained / "log.csv")] == ["1", "1", "2", "2"]


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--way", "5"], "--way cannot change on resume (checkpoint: 2)"),
        (["--lr", "0.5"], "--lr cannot change on resume (checkpoint: 0.02)"),
        (["--out", "elsewhere"], "--out cannot change on resume"),
        (["--preset", "synthetic-cpu"], "--preset does not apply with --resume"),
        (["--overwrite"], "--overwrite does not apply with --resume"),
    ],
)
def test_resume_refuses_what_cannot_change(trained, capsys, extra, expected) -> None:
    before = (trained / "last.pt").read_bytes()
    assert train_cli.main(["--resume", str(trained / "last.pt"), *extra]) == 2
    line = _error(capsys)
    assert expected in line, line
    if "--way" in extra:
        assert "--epochs" in line and "--eval-runs" in line  # says what may change
    assert (trained / "last.pt").read_bytes() == before


def test_resume_accepts_unchanged_values_and_free_options(trained, capsys) -> None:
    args = [
        "--resume",
        str(trained / "last.pt"),
        "--way",
        "2",
        "--out",
        str(trained),
        "--eval-runs",
        "3",
        "--epochs",
        "4",
        "--print-config",
    ]
    assert train_cli.main(args) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["eval"]["eval_runs"] == 3 and config["train"]["epochs"] == 4
    assert config["model"]["channels"] == 16 and config["train"]["out"] == str(trained)


def test_print_config_prints_the_resolved_configuration(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert train_cli.main(["--print-config", "--way", "5", "--lr", "0.01"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == preset("synthetic-cpu", way=5, lr=0.01).to_dict()
    assert printed["model"]["backbone"] == "small"
    assert printed["train"]["out"] == "runs/synthetic-cpu"
    assert not Path("runs").exists()
    assert (
        train_cli.main(["--print-config", "--preset", "pascal-2way-1shot", "--data-root", "VOC"])
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"]["image_size"] == 473
    assert printed["train"]["out"] == "runs/pascal-2way-1shot/fold0"


def _help(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


def test_help_shows_the_defaults_of_the_chosen_preset(capsys) -> None:
    text = _help(train_cli.main, [], capsys)
    for option, value in (
        ("--backbone", "small"),
        ("--image-size", "96"),
        ("--epochs", "9"),
        ("--out", "runs/synthetic-cpu"),
        ("--eval-batch-size", "20"),
        ("--memory-format", "channels_last"),
        ("--pml-start-epoch", "2"),
        ("--lr", "0.02"),
    ):
        assert re.search(
            re.escape(option) + r" [A-Z_{].*?\(default: " + re.escape(value) + r"\)", text
        ), option
    assert "resnet50)" not in text.split("--backbone")[-1].split("--weights")[0]
    text = _help(train_cli.main, ["--preset", "pascal-2way-1shot"], capsys)
    assert "(default: resnet50)" in text and "(default: 473)" in text
    assert "(default: runs/pascal-2way-1shot/fold0)" in text
    text = _help(evaluate_cli.main, [], capsys)
    assert "(default: the checkpoint's)" in text and "(default: 8)" not in text


def test_a_short_run_says_that_pml_never_switches_on(tmp_path, capsys) -> None:
    assert train_cli.main([*TINY, "--out", str(tmp_path / "a"), "--pml-start-epoch", "1"]) == 0
    err = capsys.readouterr().err  # a warning: on stderr, like every command's warnings
    assert "warning: the pixel-wise metric loss (PML) never switches on" in err
    assert "--epochs 2" in err
    assert train_cli.main([*TINY, "--out", str(tmp_path / "b"), "--pml-start-epoch", "0"]) == 0
    captured = capsys.readouterr()
    assert "never switches on" not in captured.out + captured.err


def test_threads_line_is_logged_at_start(tmp_path, capsys) -> None:
    assert train_cli.main([*TINY, "--out", str(tmp_path / "a"), "--threads", "1"]) == 0
    assert "threads: 1 (" in capsys.readouterr().out and torch.get_num_threads() == 1


# ------------------------------------------------------------ every command of the READMEs
def readme_commands() -> list[list[str]]:
    """Each command of the ```bash blocks of README.md and runtime/README.md, as argv lists
    (continuation lines joined, comments dropped, ``a && b`` split)."""
    commands = []
    for readme in (ROOT / "README.md", ROOT / "runtime" / "README.md"):
        for block in re.findall(r"```bash\n(.*?)```", readme.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                for part in line.split("&&"):
                    words = shlex.split(part, comments=True)
                    if words:
                        commands.append(words)
    return commands


def python_target(words: list[str]) -> tuple[str, list[str]] | None:
    """("-m module" or "script.py", its arguments) of a python / torchrun command, else None."""
    if words[0] not in ("python", "python3", "torchrun") and "=" not in words[0]:
        return None
    words = [w for w in words if "=" not in w or w.startswith("--")]  # VAR=value prefixes
    if words and words[0] in ("python", "python3", "torchrun") and "-m" in words:
        i = words.index("-m")
        if words[i + 1] in ("venv", "pytest", "pip"):
            return None
        return f"-m {words[i + 1]}", words[i + 2 :]
    scripts = [w for w in words if w.endswith(".py")]
    if words and words[0] in ("python", "python3") and scripts:
        i = words.index(scripts[0])
        return scripts[0], words[i + 1 :]
    return None


def test_readme_commands_are_found() -> None:
    targets = {t[0] for t in map(python_target, readme_commands()) if t is not None}
    assert {
        "-m mfnet.train",
        "-m mfnet.evaluate",
        "-m mfnet.predict",
        "-m mfnet_runtime",
        "-m mfnet.export",
    } <= targets, targets


def test_every_readme_command_parses(capsys) -> None:
    """The arguments shown parse with the real parsers (no training, no I/O)."""
    from mfnet import predict
    from mfnet.export import command as export_command
    from mfnet_runtime import cli

    parsers = {
        "-m mfnet.evaluate": lambda: evaluate_cli.build_parser(),
        "-m mfnet_runtime": cli.build_parser,
        "-m mfnet.predict": predict.build_parser,
        "-m mfnet.export": export_command.build_parser,
    }
    # the export scripts are the export command's sub-commands
    scripts = {"export/to_onnx.py": "onnx", "export/to_trt.py": "trt", "export/verify.py": "verify"}
    checked = 0
    for target in filter(None, map(python_target, readme_commands())):
        name, args = target
        if "--help" in args:  # test_every_readme_module_and_script_answers_help
            continue
        if name in scripts:
            name, args = "-m mfnet.export", [scripts[name], *args]
        if name == "-m mfnet.train":
            parser = train_cli.build_parser(train_cli._chosen_preset(args))
        elif name in parsers:
            parser = parsers[name]()
        else:
            continue
        parser.parse_args(args)  # SystemExit(2) on an option that does not exist
        checked += 1
    assert checked >= 15


def test_every_readme_module_and_script_answers_help() -> None:
    """``--help`` of each distinct module / script (and sub-command) shown, as a new process."""
    seen = set()
    for target in filter(None, map(python_target, readme_commands())):
        name, args = target
        sub = [args[0]] if args and not args[0].startswith("-") and name.startswith("-m") else []
        key = (name, *sub)
        if key in seen:
            continue
        seen.add(key)
        command = [sys.executable, *name.split(), *sub, "--help"]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, (command, done.stderr[-2000:])
        assert "usage:" in done.stdout, command
    assert len(seen) >= 10, seen
