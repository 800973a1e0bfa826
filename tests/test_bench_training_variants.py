"""benchmarks/bench_training_variants.py trains and evaluates its variants at a tiny size and
writes its JSON; a diverged variant is kept as a row with its error line."""

from __future__ import annotations

import json
import math

from tests.scripts import load_script

SCRIPT = "benchmarks/bench_training_variants.py"
TINY = (
    "--episodes-per-epoch 16 --batch-size 4 --eval-runs 2 --eval-episodes 8 --eval-batch-size 4 "
    "--pml-start-epoch 0 --visuals 0 --workers 0 --image-size 48"
)


def test_variants_train_evaluate_and_a_diverged_one_is_a_row(tmp_path, capsys) -> None:
    bench = load_script(SCRIPT)
    bench.SETS["tiny"] = {
        "mean": ["--pml-reduction", "mean"],
        "diverges": ["--lr", "1e12"],
    }
    argv = ["--set", "tiny", "--epochs", "1", "--train-args", TINY, "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    payload = json.loads((tmp_path / "training_variants_tiny.json").read_text())
    rows = payload["variants"]
    assert list(rows) == ["mean", "diverges"] and payload["train_args"] == TINY
    results = rows["mean"]["results"]
    assert set(results) == {"MFNet", "baseline"}
    assert all(0.0 <= value <= 1.0 for value in results["MFNet"].values())
    assert "--image-size 48" in rows["mean"]["command"]
    assert math.isfinite(rows["mean"]["pml_curve"][0])
    assert rows["diverges"]["failed"].startswith("error: loss became nan")
    table = capsys.readouterr().out
    assert "| diverges | error: loss became nan" in table and "| mean | " in table


def test_pml_curve_is_the_mean_logged_pml_per_epoch(tmp_path) -> None:
    log = tmp_path / "log.csv"
    log.write_text("step,epoch,loss,seg,pml,lr\n1,1,1,1,,0.1\n2,2,1,1,0.5,0.1\n3,2,1,1,0.25,0.1\n")
    assert load_script(SCRIPT).pml_curve(log) == [None, 0.375]
