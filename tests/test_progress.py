"""Progress of the library's loops: tqdm's bar on a terminal, whole lines elsewhere."""

from __future__ import annotations

import io

from tqdm import tqdm

from mfnet.progress import ProgressLines, progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_file_gets_one_whole_line_per_tenth_and_the_last() -> None:
    stream = io.StringIO()
    bar = progress_bar(range(20), "epoch 1/2", stream=stream)
    assert isinstance(bar, ProgressLines)
    for step in bar:
        bar.set_postfix({"loss": f"{1 / (step + 1):.2f}"})
    bar.close()
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert [line.split(" (")[0] for line in lines] == [
        f"epoch 1/2: {n}/20" for n in range(2, 21, 2)
    ]
    assert lines[0] == "epoch 1/2: 2/20 (10%), loss=0.50"
    assert lines[-1] == "epoch 1/2: 20/20 (100%), loss=0.05"


def test_a_resumed_loop_counts_from_its_start_and_an_early_stop_shows_its_count() -> None:
    stream = io.StringIO()
    bar = progress_bar(iter(range(7)), "epoch 2/3", total=10, initial=3, stream=stream)
    assert list(bar) == list(range(7))
    assert stream.getvalue().splitlines() == [
        f"epoch 2/3: {n}/10 ({10 * n}%)" for n in range(4, 11)
    ]
    stream = io.StringIO()
    bar = progress_bar(range(20), "epoch 1/1", stream=stream)
    for step in bar:
        if step == 3:  # three steps done: past the 10 % line, short of the 20 % one
            break
    bar.close()
    assert stream.getvalue().splitlines() == ["epoch 1/1: 2/20 (10%)", "epoch 1/1: 3/20 (15%)"]


def test_disabled_progress_writes_nothing_and_a_terminal_gets_a_bar() -> None:
    stream = io.StringIO()
    bar = progress_bar([1, 2, 3], "eval run 1/1", enabled=False, stream=stream)
    assert list(bar) == [1, 2, 3]
    bar.close()
    assert stream.getvalue() == ""
    terminal = _Terminal()
    bar = progress_bar([1, 2, 3], "eval run 1/1", unit="batch", stream=terminal)
    assert isinstance(bar, tqdm) and list(bar) == [1, 2, 3]
    bar.close()
    assert "eval run 1/1" in terminal.getvalue()
