"""Real-benchmark integration: presets, dataset dispatch, original-resolution scoring, fold
tables, the naive N x 1-way evaluation and the N-binary-branches baseline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mfnet import evaluate as evaluate_cli
from mfnet import train as train_cli
from mfnet.config import PRESETS, preset
from mfnet.data import datasets
from mfnet.data.errors import DatasetArgumentError
from mfnet.data.pascal import voc_palette
from mfnet.data.prepare_pascal import prepare
from mfnet.model.build import build_mfnet
from mfnet.model.naive import NaiveMultiWay
from mfnet.protocol import ProtocolResult, fold_table, score_maps
from mfnet.training.objective import compute_losses

# (classes per image); fold 0: novel 1..5, base 6..20. Train images hold base classes (and one
# novel class, which must come out as background); val images hold novel classes.
TRAIN = [(6, 7), (8, 9), (6, 8), (7, 9), (6, 9), (7, 8), (8, 6), (9, 7), (1, 6)]
VAL = [(1, 2), (1, 3), (2, 3), (1, 2), (3, 1), (2, 15), (3, 2), (1, 15)]


def make_voc(root: Path, train: list = TRAIN, val: list = VAL) -> Path:
    """A tiny VOCdevkit/VOC2012 in the real layout: JPEGs, palette PNGs with 255 bands, lists;
    ``train`` / ``val``: the classes of each image (at most two)."""
    voc = root / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    palette = voc_palette().flatten().tolist()
    names = {"train": [], "val": []}
    for split, items in (("train", train), ("val", val)):
        for index, classes in enumerate(items):
            name = f"2010_{split}{index:03d}"
            names[split].append(name)
            height, width = 60, 80  # not square: the test resize must keep the aspect ratio
            label = np.zeros((height, width), np.uint8)
            image = rng.integers(0, 60, (height, width, 3)).astype(np.uint8)
            for k, c in enumerate(classes):
                top, left = 8 + 20 * k, 6 + 34 * k
                label[top - 1 : top + 23, left - 1 : left + 33] = 255  # VOC boundary band
                label[top : top + 22, left : left + 32] = c
                image[top : top + 22, left : left + 32] = (40 * (c % 6), 25 * (c % 10), 200 - 9 * c)
            Image.fromarray(image).save(voc / "JPEGImages" / f"{name}.jpg", quality=95)
            png = Image.fromarray(label, mode="P")
            png.putpalette(palette)
            png.save(voc / "SegmentationClass" / f"{name}.png")
        (voc / "ImageSets/Segmentation" / f"{split}.txt").write_text("\n".join(names[split]))
    prepare(voc, progress=False)
    return voc


def test_every_paper_preset_is_a_valid_config() -> None:
    for name in PRESETS:
        config = preset(name, data_root="/data")
        assert config.model.image_size in (96, 473)
    c = preset("pascal-2way-1shot", data_root="/data")
    assert (
        c.model.backbone,
        c.model.channels,
        c.train.lr,
        c.train.batch_size,
        c.train.epochs,
        c.loss.pml_start_epoch,
        c.eval.eval_episodes,
    ) == ("resnet50", 256, 0.0025, 4, 200, 5, 1000)
    c = preset("coco-5way-1shot", data_root="/data")
    assert (
        c.model.way,
        c.train.lr,
        c.train.batch_size,
        c.train.epochs,
        c.loss.pml_start_epoch,
        c.eval.eval_episodes,
    ) == (5, 0.005, 8, 50, 1, 10000)
    metaseg = preset("pascal-metaseg-2way-5shot", data_root="/data")
    assert (metaseg.data.fold, metaseg.data.protocol, metaseg.model.shot) == (2, "metaseg", 5)
    with pytest.raises(ValueError, match="needs --data-root"):
        preset("pascal-2way-1shot")


def test_pascal_train_and_evaluate_at_original_resolution(tmp_path, capsys) -> None:
    voc = make_voc(tmp_path)
    common = [
        "--dataset",
        "pascal",
        "--data-root",
        str(voc),
        "--image-size",
        "48",
        "--channels",
        "16",
        "--workers",
        "0",
    ]
    code = train_cli.main(
        common
        + [
            "--epochs",
            "1",
            "--episodes-per-epoch",
            "4",
            "--batch-size",
            "2",
            "--pml-start-epoch",
            "0",
            "--eval-runs",
            "1",
            "--eval-episodes",
            "4",
            "--eval-batch-size",
            "2",
            "--out",
            str(tmp_path / "run"),
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "PASCAL-5i, fold 0" in printed and "test images VOC2012 val" in printed
    checkpoint = tmp_path / "run" / "last.pt"
    code = evaluate_cli.main(
        [
            "--checkpoint",
            str(checkpoint),
            "--eval-resolution",
            "original",
            "--eval-runs",
            "1",
            "--eval-episodes",
            "5",
            "--eval-batch-size",
            "3",
            "--workers",
            "0",
            "--no-progress",
            "--json",
            str(tmp_path / "eval.json"),
        ]
    )
    assert code == 0
    assert "scored at original resolution" in capsys.readouterr().out
    results = json.loads((tmp_path / "eval.json").read_text())["results"]["MFNet"]
    assert 0.0 <= results["fbiou_mean"] <= 1.0
    # fold and dataset are the checkpoint's: not options of the evaluation
    with pytest.raises(SystemExit) as exit_info:
        evaluate_cli.main(["--checkpoint", str(checkpoint), "--fold", "1"])
    assert exit_info.value.code == 2


def test_pascal_episodes_remap_labels_and_keep_original(tmp_path) -> None:
    voc = make_voc(tmp_path)
    config = preset(
        "synthetic-cpu",
        dataset="pascal",
        data_root=str(voc),
        image_size=48,
        eval_resolution="original",
    )
    train = datasets.build_episodes(config, "train", 1, 6, seed=0)
    for index in range(len(train)):
        episode = train[index]
        assert set(episode["episode_classes"].tolist()) <= set(range(6, 21))
        assert set(episode["query_label"].unique().tolist()) <= {0, 1, 2, 255}
    test = datasets.build_episodes(config, "test", 1, 6, seed=0)
    for index in range(len(test)):
        episode = test[index]
        assert set(episode["episode_classes"].tolist()) <= set(range(1, 6))
        original = episode["query_label_original"]
        assert original.shape == (60, 80)
        assert episode["query_content"].tolist() == [36, 48]  # longer side 80 -> 48, aspect kept
        assert set(original.unique().tolist()) <= {0, 1, 2, 255}
        assert bool(((original == 1) | (original == 2)).any())


def test_metaseg_needs_person_among_the_novel_classes(tmp_path) -> None:
    voc = make_voc(tmp_path)
    config = preset("synthetic-cpu", dataset="pascal", data_root=str(voc), protocol="metaseg")
    with pytest.raises(ValueError, match="use --fold 2"):
        datasets.build_episodes(config, "test", 1, 2, seed=0)


# PASCAL-5^2 (novel 11..15, person = 15): person + dog (12) in three val images, person + horse
# (13) in two, and images with one novel class only.
METASEG_VAL = [(15, 12), (12, 15), (15, 12), (13, 15), (15, 13), (12, 13), (11,), (15,), (12,)]


def test_metaseg_builds_queries_and_supports_from_images_with_person_and_the_other(
    tmp_path,
) -> None:
    voc = make_voc(tmp_path, val=METASEG_VAL)
    config = preset(
        "synthetic-cpu",
        dataset="pascal",
        data_root=str(voc),
        fold=2,
        protocol="metaseg",
        image_size=48,
    )
    episodes = datasets.build_episodes(config, "test", 2, 6, seed=0)
    names = [f"2010_val{i:03d}" for i in range(len(METASEG_VAL))]
    with_both = {
        n for n, classes in zip(names, METASEG_VAL, strict=True) if {12, 15} <= set(classes)
    }
    assert episodes.combinations == ((12, 15),)  # (13, 15): two images, 2-shot needs three
    assert episodes.short_combinations == {(13, 15): 2}  # (12, 13) holds no person: no combination
    loaded: list[str] = []
    real_load = episodes.images.load
    episodes.images.load = lambda image_id: (loaded.append(image_id), real_load(image_id))[1]
    for index in range(len(episodes)):
        loaded.clear()
        episode = episodes[index]
        assert sorted(episode["episode_classes"].tolist()) == [12, 15]
        assert len(set(loaded)) == 3 and set(loaded) <= with_both  # the query and two supports
        masks = episode["support_masks"]  # [2, 2, 48, 48]
        assert set(masks.unique().tolist()) <= {0, 1, 255} and bool(
            (masks == 1).any(-1).any(-1).all()
        )
        assert {1, 2} <= set(episode["query_label"].unique().tolist())
    with pytest.raises(DatasetArgumentError, match=r"fewer than shot \+ 1 = 4 images"):
        datasets.build_episodes(config, "test", 3, 6, seed=0)


def test_coco_dispatch_uses_the_configured_split_and_folds(monkeypatch) -> None:
    calls = []

    class Recorder:
        def __init__(self, *args, **kwargs):
            calls.append((args, kwargs))
            raise RuntimeError("recorded")

    monkeypatch.setattr(datasets.coco, "CocoImages", Recorder)
    config = preset(
        "coco-2way-1shot", data_root="/coco", fold_split="B", fold=3, min_object_pixels=2048
    )
    for split in ("train", "test"):
        with pytest.raises(RuntimeError, match="recorded"):
            datasets.build_episodes(config, split, 1, 1, seed=0)
    assert calls[0] == (
        ("/coco", "train", 3, "train"),
        {"fold_split": "B", "min_object_pixels": 2048},
    )
    # the 2-way preset tests on the training list, as PANet/PPNet (docs/decisions.md)
    assert calls[1] == (
        ("/coco", "train", 3, "test"),
        {"fold_split": "B", "min_object_pixels": 2048},
    )
    assert datasets.novel_class_ids(config) == tuple(4 * k + 4 for k in range(20))
    assert "COCO-20i split B, fold 3" in datasets.describe(config)


def test_score_maps_maps_the_content_back_to_the_original_size() -> None:
    logits = torch.zeros(3, 8, 8)  # [N+1, S, S]; the image occupies the top-left 4 x 8
    logits[1, :4, :4] = 5.0
    logits[2, :4, 4:] = 5.0
    logits[2, 4:, :] = 9.0  # padding: must be cut away
    batch = {
        "query_label_original": [torch.zeros(2, 4, dtype=torch.int64)],
        "query_content": torch.tensor([[4, 8]]),
    }
    pred, target = score_maps(logits, batch, 0)
    assert pred.shape == target.shape == (2, 4)
    assert pred[:, :2].eq(1).all() and pred[:, 2:].eq(2).all()


def test_fold_table_layout() -> None:
    def result(star, panet):
        run = {"miou_star": star, "miou": panet, "fbiou": 0.7}
        return ProtocolResult((run, run))

    per_fold = {
        f: {"MFNet": result(0.5 + f / 100, 0.6), "baseline": result(0.4, 0.45)} for f in range(4)
    }
    markdown, csv = fold_table(per_fold)
    lines = markdown.splitlines()
    assert lines[0] == "| Method | fold-0 | fold-1 | fold-2 | fold-3 | Mean |"
    assert lines[2] == "| MFNet | 50.0/60.0 | 51.0/60.0 | 52.0/60.0 | 53.0/60.0 | 51.5/60.0 |"
    assert csv.splitlines()[1].startswith("MFNet,0,50.00,0.00,60.00,0.00,70.00,0.00")


def test_naive_multi_way_takes_the_per_pixel_maximum() -> None:
    class FixedOneWay(torch.nn.Module):
        """Foreground logit = 10 x mean(support image) + query value - 0.5, background 0."""

        way = 1

        def forward(self, images, masks, query):
            foreground = images.mean() * 10 + query[:, 0] - 0.5
            return torch.stack([torch.zeros_like(foreground), foreground], dim=1)

    images = torch.stack(
        [torch.full((1, 1, 3, 2, 3), 0.1), torch.full((1, 1, 3, 2, 3), 0.02)], dim=1
    )  # [1, 2, 1, 3, 2, 3]: class 1's run is the more confident
    query = torch.zeros(1, 3, 2, 3)
    query[0, 0, :, 0], query[0, 0, :, 1], query[0, 0, :, 2] = 0.5, -0.3, -2.0
    scores = NaiveMultiWay(FixedOneWay())(images, torch.ones(1, 2, 1, 2, 3), query)
    assert scores.shape == (1, 3, 2, 3)
    # column 0: fg1 = sigmoid(1.0) = .73 beats bg2 = .45 -> class 1
    # column 1: fg1 = sigmoid(0.2) = .55 < bg2 = 1 - sigmoid(-0.6) = .65 -> background: the
    #           background of ANY run counts in the per-pixel maximum (paper Table V)
    # column 2: everything is background
    assert scores.argmax(1)[0].tolist() == [[1, 0, 0], [1, 0, 0]]
    with pytest.raises(ValueError, match="needs a 1-way model"):
        NaiveMultiWay(build_mfnet(preset("synthetic-cpu").model))


def test_binary_branches_baseline_trains_and_decodes(tiny_config) -> None:
    torch.manual_seed(0)
    config = tiny_config.replace(class_fusion="binary")
    model = build_mfnet(config.model).train()
    assert model.decoder.classifier.out_channels == 2
    batch = next(
        iter(
            torch.utils.data.DataLoader(
                datasets.build_episodes(config, "train", 1, 2, seed=0), batch_size=2
            )
        )
    )
    losses = compute_losses(model, batch, config, use_metric_loss=True)
    assert losses.metric is None  # no PML in this baseline (paper Sec. IV-C)
    losses.total.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        logits = model(batch["support_images"], batch["support_masks"], batch["query_image"])
    assert logits.shape == (2, 3, 48, 48) and torch.isfinite(logits).all()
    # channel 0 is the largest background log-probability: never above 0
    assert (logits[:, 0] <= 1e-6).all()
