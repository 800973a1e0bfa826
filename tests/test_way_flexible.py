"""Any number of classes: way-flexible models (``--max-way``) and decoding in groups.

A way-flexible checkpoint segments 1..Nmax classes in PyTorch, in the exported graph and in the
runtime with the same labels; its empty slots never appear in a label map; more classes than
slots (and n != N on a fixed-N model) are decoded in groups and merged by the documented rule;
a fixed-N model is unchanged unless the fallback is asked for. Every label comparison runs on a
model whose labels vary (``assert_labels_vary``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mfnet.checkpoint import model_from_checkpoint
from mfnet.config import ConfigError, ModelConfig
from mfnet.data.datasets import build_episodes
from mfnet.data.episodes import synthetic_episodes
from mfnet.evaluate import evaluate_model
from mfnet.model.backbone import feature_size
from mfnet.model.build import build_mfnet
from mfnet.model.grouping import GroupedMultiWay, grouped_scores
from mfnet.model.inference import FastQueryDecoder
from mfnet.model.slots import EMPTY_SLOT_LOGIT
from mfnet.model.support import EncodedSupport
from mfnet.training.loop import train
from mfnet_runtime.errors import RuntimeInputError
from mfnet_runtime.grouping import merge_groups, plan_groups
from runtime_fixtures import assert_labels_vary, varied_model

SLOTS = 3  # Nmax of the way-flexible test model


@pytest.fixture(scope="module")
def flexible():
    """The varied way-flexible model (3 slots, 48 px, 16 channels), eval mode."""
    model, _ = varied_model(way=SLOTS, max_way=SLOTS)
    return model


def held_out(way: int, count: int = 3, seed: int = 7) -> list[dict]:
    """Fold-0 test episodes of ``way`` classes at 48 px."""
    episodes = synthetic_episodes(
        fold=0,
        split="test",
        way=way,
        shot=1,
        num_episodes=count,
        seed=seed,
        image_size=48,
        feature_size=feature_size("small", 48),
    )
    return [episodes[i] for i in range(count)]


def encode(model, episode: dict) -> EncodedSupport:
    with torch.no_grad():
        return model.encode_support(episode["support_images"], episode["support_masks"])


def queries(episodes: list[dict]) -> torch.Tensor:
    return torch.stack([e["query_image"] for e in episodes])  # [E, 3, 48, 48]


# --------------------------------------------------------------------------- configuration
def test_max_way_configuration():
    assert ModelConfig(way=2).slots == 2
    assert ModelConfig(way=2, max_way=5).slots == 5
    with pytest.raises(ConfigError, match="max_way"):
        ModelConfig(max_way=-1)
    with pytest.raises(ConfigError, match="max_way"):
        ModelConfig(max_way=255)
    with pytest.raises(ConfigError, match="paper's MFNet"):
        ModelConfig(max_way=3, class_fusion="binary")


def test_fixed_model_has_no_slot_state(flexible):
    """A fixed-N checkpoint keeps its state dict (old checkpoints load unchanged); the
    way-flexible one adds only the "no class" prototype."""
    fixed = build_mfnet(ModelConfig(backbone="small", channels=16, image_size=48, way=2))
    assert not any("class_slots" in key for key in fixed.state_dict())
    extra = [key for key in flexible.state_dict() if "class_slots" in key]
    assert extra == ["class_slots.empty"]


# --------------------------------------------------------------------------------- PyTorch
@pytest.mark.parametrize("count", [1, 2, 3])
def test_flexible_model_segments_1_to_nmax_classes(flexible, count):
    episodes = held_out(count)
    cache = encode(flexible, episodes[0])
    with torch.no_grad():
        logits = flexible.decode_query(queries(episodes), cache)
        fast = FastQueryDecoder(flexible).eval()(queries(episodes), cache.prototypes)
    assert logits.shape == (3, count + 1, 48, 48)
    labels = logits.argmax(1).numpy()
    assert labels.max() <= count  # an empty slot is never a label
    assert_labels_vary(list(labels), min_labels=min(count + 1, 2))
    # the fast decoder (what is exported) agrees, and so does the explicit slot form
    assert (fast.argmax(1).numpy() == labels).mean() >= 0.999
    padded = torch.zeros(3, SLOTS, cache.prototypes.shape[-1])
    padded[:, :count] = cache.prototypes[0]
    mask = (torch.arange(SLOTS) < count).expand(3, -1)
    with torch.no_grad():
        slotted = flexible.decode_slots(queries(episodes), padded, mask)
    assert torch.allclose(slotted[:, : count + 1], logits, atol=1e-5)
    empty = slotted[:, count + 1 :] - EMPTY_SLOT_LOGIT  # upsampled: equal up to rounding
    assert empty.numel() == 0 or float(empty.abs().max()) < 1e-2


def test_empty_slot_rows_are_ignored(flexible):
    """Whatever the caller leaves in an empty slot's prototype row, the graph uses the learned
    "no class" prototype there: the output does not change."""
    episodes = held_out(2)
    cache = encode(flexible, episodes[0])
    mask = torch.tensor([[True, True, False]])
    rows = torch.zeros(1, SLOTS, cache.prototypes.shape[-1])
    rows[:, :2] = cache.prototypes[0]
    garbage = rows.clone()
    garbage[:, 2] = 100.0
    with torch.no_grad():
        a = flexible.decode_slots(queries(episodes[:1]), rows, mask)
        b = flexible.decode_slots(queries(episodes[:1]), garbage, mask)
    assert torch.equal(a, b)


def test_flexible_model_refuses_more_classes_than_slots(flexible):
    cache = encode(flexible, held_out(4, count=1)[0])
    with pytest.raises(ValueError, match=r"1\.\.3"):
        flexible.decode_query(queries(held_out(1, count=1)), cache)


def test_no_class_prototype_gets_gradients(flexible):
    """Training with fewer classes than slots reaches the learned empty prototype."""
    model, _ = varied_model(way=SLOTS, max_way=SLOTS)
    episode = held_out(1, count=1)[0]
    model.train()
    cache = model.encode_support(episode["support_images"], episode["support_masks"])
    model.decode_query(episode["query_image"][None], cache).sum().backward()
    assert model.class_slots.empty.grad is not None
    assert float(model.class_slots.empty.grad.abs().sum()) > 0


# ------------------------------------------------------------------------------- training
def test_mixed_way_episodes_share_n_within_a_global_batch(tiny_config):
    config = tiny_config.replace(max_way=3, way=3)
    episodes = build_episodes(config, "train", 1, 24, seed=5, batch_group=4)
    ways = [episodes[i]["episode_classes"].shape[0] for i in range(24)]
    for start in range(0, 24, 4):
        assert len(set(ways[start : start + 4])) == 1, ways
    assert set(ways) > {1} and set(ways) <= {1, 2, 3}  # more than one n, all within 1..3
    batch = next(iter(DataLoader(episodes, batch_size=4)))  # a batch stacks
    assert batch["support_images"].shape[1] == ways[0]


def test_way_flexible_training_runs_and_evaluates_at_any_n(tiny_config):
    """--max-way 3 trains (episodes of 1..3 classes), its checkpoint reloads way-flexible and
    is evaluated at n = 1 and n = 3 with the protocol, and at n = 4 in groups."""
    config = tiny_config.replace(max_way=3, way=3, episodes_per_epoch=16)
    _, checkpoint = train(config, progress=False)
    model, saved = model_from_checkpoint(checkpoint, map_location="cpu")
    assert model.way_flexible and model.way == 3 and saved.model.max_way == 3
    for count, grouped in ((1, False), (3, False), (4, True)):
        results = evaluate_model(
            model, saved.replace(way=count), torch.device("cpu"), False, False, grouped=grouped
        )
        (result,) = results.values()
        assert 0.0 <= result.mean("miou_star") <= 100.0 and result.mean("fbiou") > 0.0


# -------------------------------------------------------------------------------- grouping
def test_plan_groups():
    assert plan_groups(5, 2, fill=False) == [(0, 1), (2, 3), (4,)]
    assert plan_groups(3, 2, fill=True) == [(0, 1), (2, 0)]  # filled with another class
    assert plan_groups(5, 2, fill=True) == [(0, 1), (2, 3), (4, 0)]
    assert plan_groups(1, 2, fill=True) == [(0, 0)]  # n < N: slots filled by repeating
    assert plan_groups(2, 3, fill=True) == [(0, 1, 0)]
    assert plan_groups(7, 5, fill=False) == [(0, 1, 2, 3), (4, 5, 6)]
    with pytest.raises(RuntimeInputError):
        plan_groups(0, 2, fill=False)


def test_merge_rule():
    """Per pixel: a class keeps the largest of its groups' probabilities (repeated slots of a
    group summed), the background the lowest of the groups'; the label is the largest score."""
    groups = [(0, 1), (2, 2)]
    # G=2 groups, B=1, N+1=3 channels, 1 x 4 pixels
    probabilities = np.array(
        [
            [[[[0.9, 0.2, 0.3, 0.5]], [[0.05, 0.7, 0.1, 0.1]], [[0.05, 0.1, 0.6, 0.4]]]],
            [[[[0.8, 0.9, 0.2, 0.3]], [[0.1, 0.05, 0.5, 0.3]], [[0.1, 0.05, 0.3, 0.4]]]],
        ],
        np.float32,
    )
    labels, merged = merge_groups(probabilities, groups, 3)
    assert merged.shape == (1, 4, 1, 4)
    np.testing.assert_allclose(merged[0, 0, 0], [0.8, 0.2, 0.2, 0.3])  # min background
    np.testing.assert_allclose(merged[0, 3, 0], [0.2, 0.1, 0.8, 0.7])  # class 2: both slots
    assert labels[0, 0].tolist() == [0, 1, 3, 3]
    # a class in two groups keeps its larger probability
    _, merged = merge_groups(probabilities, [(0, 1), (2, 0)], 3)
    np.testing.assert_allclose(merged[0, 1, 0], [0.1, 0.7, 0.3, 0.4])  # max(slot 1 of g0, g1)
    np.testing.assert_allclose(merged[0, 3, 0], [0.1, 0.05, 0.5, 0.3])


def test_grouping_on_a_flexible_model_matches_manual_groups(flexible):
    """n = 5 > Nmax = 3: groups (0, 1, 2) and (3, 4), each decoded as its own support set,
    merged by the rule; the batched call equals that."""
    episodes = held_out(5)
    cache = encode(flexible, episodes[0])
    query = queries(episodes)
    with torch.no_grad():
        scores = grouped_scores(flexible, query, cache.prototypes)
        first = flexible.decode_query(
            query, EncodedSupport(cache.shot_features[:, :3], cache.prototypes[:, :3])
        )
        second = flexible.decode_query(
            query, EncodedSupport(cache.shot_features[:, 3:], cache.prototypes[:, 3:])
        )
    padded = torch.zeros(2, 3, SLOTS + 1, 48, 48)
    padded[0] = first.softmax(1)
    padded[1, :, :3] = second.softmax(1)
    labels, merged = merge_groups(padded.numpy(), [(0, 1, 2), (3, 4)], 5)
    np.testing.assert_allclose(scores.numpy(), merged, atol=1e-5)
    assert scores.shape == (3, 6, 48, 48)
    assert_labels_vary(list(scores.argmax(1).numpy()), min_labels=3)


def test_fixed_model_unchanged_unless_grouping_is_asked():
    """A fixed 2-way model: GroupedMultiWay at n = N is decode_query itself (same logits);
    n = 3 and n = 1 go through groups (repeated prototypes fill the slots)."""
    model, _ = varied_model(way=2)
    grouped = GroupedMultiWay(model).eval()
    two = held_out(2)[0]
    with torch.no_grad():
        direct = model(
            two["support_images"][None], two["support_masks"][None], two["query_image"][None]
        )
        via = grouped(
            two["support_images"][None], two["support_masks"][None], two["query_image"][None]
        )
    assert torch.equal(direct, via)
    for count in (1, 3):
        episode = held_out(count)[0]
        with pytest.raises(ValueError, match="2-way"):
            model(
                episode["support_images"][None],
                episode["support_masks"][None],
                episode["query_image"][None],
            )
        with torch.no_grad():
            scores = grouped(
                episode["support_images"][None],
                episode["support_masks"][None],
                episode["query_image"][None],
            )
        assert scores.shape[1] == count + 1 and int(scores.argmax(1).max()) <= count


# -------------------------------------------------------------------------- export, runtime
def uint8_images(images: torch.Tensor) -> np.ndarray:
    """float [..., 3, H, W] in [0, 1] -> uint8 [..., H, W, 3]."""
    return (images * 255).round().to(torch.uint8).movedim(-3, -1).numpy()


def support_dict(episode: dict) -> dict:
    """An episode's support set as the runtime takes it: {name: [(image, mask)]}."""
    images = uint8_images(episode["support_images"])  # [n, K, H, W, 3]
    masks = episode["support_masks"].numpy()  # [n, K, H, W]
    return {
        f"class{c}": [(images[c, k], masks[c, k]) for k in range(images.shape[1])]
        for c in range(images.shape[0])
    }


def torch_scores(model, episode: dict, frames: np.ndarray) -> torch.Tensor:
    """PyTorch's scores on the runtime's inputs (uint8 frames and supports)."""
    images = torch.from_numpy(uint8_images(episode["support_images"])).movedim(-1, -3) / 255.0
    query = torch.from_numpy(frames).movedim(-1, -3).float() / 255.0
    with torch.no_grad():
        return GroupedMultiWay(model)(images[None].float(), episode["support_masks"][None], query)


@pytest.fixture(scope="module")
def flexible_export(tmp_path_factory):
    """(engine_dir, model) of the way-flexible varied model, exported and verified."""
    pytest.importorskip("onnxruntime")
    from mfnet.checkpoint import model_from_checkpoint as load
    from runtime_fixtures import export_varied

    engine_dir, checkpoint, _ = export_varied(
        tmp_path_factory.mktemp("flexible"), way=SLOTS, max_way=SLOTS
    )
    return engine_dir, load(checkpoint, map_location="cpu")[0]


def test_flexible_export_manifest(flexible_export):
    from mfnet_runtime.manifest import read_manifest

    manifest = read_manifest(flexible_export[0])
    assert manifest.model.way_flexible and manifest.model.way == SLOTS
    (decoder,) = [g for g in manifest.graphs if g.role == "query_decoder"]
    assert [(t.name, t.shape, t.dtype) for t in decoder.inputs][-1] == (
        "slot_mask",
        ("B", SLOTS),
        "uint8",
    )
    assert manifest.verification["passed"]


@pytest.mark.parametrize("count", [1, 2, 3])
def test_runtime_segments_1_to_nmax_classes_as_pytorch(flexible_export, count):
    from mfnet_runtime import Segmenter

    engine_dir, model = flexible_export
    episodes = held_out(count)
    frames = uint8_images(queries(episodes))  # [3, 48, 48, 3]
    with Segmenter.load(engine_dir, device="cpu") as segmenter:
        support = segmenter.encode_support(support_dict(episodes[0]))
        labels, probabilities = segmenter.decode_with_probabilities(frames, support)
    reference = torch_scores(model, episodes[0], frames).argmax(1).numpy()
    assert_labels_vary(list(reference), min_labels=2)
    assert probabilities.shape == (3, count + 1, 48, 48)
    assert labels.max() <= count  # no empty slot
    assert (labels == reference).mean() >= 0.999


def test_runtime_groups_beyond_nmax_and_edits_support_sets(flexible_export):
    from mfnet_runtime import Segmenter

    engine_dir, model = flexible_export
    episodes = held_out(5)
    frames = uint8_images(queries(episodes))
    with Segmenter.load(engine_dir, device="cpu") as segmenter:
        with pytest.raises(RuntimeInputError, match="at most 3"):
            segmenter.encode_support(support_dict(episodes[0]))
    with Segmenter.load(engine_dir, device="cpu", group_classes=True) as segmenter:
        support = segmenter.encode_support(support_dict(episodes[0]))
        labels = segmenter.decode_prepared(frames, support)
        reference = torch_scores(model, episodes[0], frames).argmax(1).numpy()
        assert_labels_vary(list(reference), min_labels=3)
        assert (labels == reference).mean() >= 0.999
        # remove_class / add_shot give usable sets of other sizes
        smaller = support.remove_class("class4").remove_class("class3")
        assert segmenter.decode_prepared(frames, smaller).max() <= 3
        first = support_dict(episodes[0])["class0"][0]
        regrown = segmenter.add_shot(smaller, "extra", *first)
        assert len(regrown.class_names) == 4
        assert segmenter.decode_prepared(frames, regrown).shape == (3, 48, 48)
        empty = segmenter.decode_with_probabilities(frames[:0], support)
        assert empty[0].shape == (0, 48, 48) and empty[1].shape == (0, 6, 48, 48)


def test_decode_frames_with_slot_masks(flexible_export):
    """Frames of streams with different numbers of classes in one call: slot masks per frame."""
    from mfnet_runtime import Segmenter

    engine_dir, _ = flexible_export
    one, three = held_out(1), held_out(3)
    frames = uint8_images(queries(three))
    with Segmenter.load(engine_dir, device="cpu") as segmenter:
        small = segmenter.encode_support(support_dict(one[0]))
        large = segmenter.encode_support(support_dict(three[0]))
        rows = np.zeros((3, SLOTS, segmenter.channels), np.float32)
        rows[0, :1], rows[1:] = small.prototypes, large.prototypes
        mask = np.array([[1, 0, 0], [1, 1, 1], [1, 1, 1]], np.uint8)
        labels, _ = segmenter.decode_frames(frames, rows, slot_mask=mask)
        assert (labels[0] == segmenter.decode_prepared(frames[:1], small)[0]).mean() >= 0.999
        assert (labels[1:] == segmenter.decode_prepared(frames[1:], large)).mean() >= 0.999
        assert labels[0].max() <= 1
        with pytest.raises(RuntimeInputError, match="slot_mask"):
            segmenter.decode_frames(frames, rows, slot_mask=mask[:2])


def test_fixed_export_groups_only_when_asked(varied_export):
    from mfnet.checkpoint import model_from_checkpoint as load
    from mfnet_runtime import Segmenter

    engine_dir, checkpoint, _ = varied_export(2)
    model = load(checkpoint, map_location="cpu")[0]
    two, five = held_out(2), held_out(5, seed=8)
    frames = uint8_images(queries(five))
    with Segmenter.load(engine_dir, device="cpu") as plain:
        with pytest.raises(RuntimeInputError, match="2-way"):
            plain.encode_support(support_dict(five[0]))
        support = plain.encode_support(support_dict(two[0]))
        expected = plain.decode_with_probabilities(frames, support)
    with Segmenter.load(engine_dir, device="cpu", group_classes=True) as grouped:
        same = grouped.decode_with_probabilities(frames, support)
        assert np.array_equal(same[0], expected[0]) and np.array_equal(same[1], expected[1])
        labels = grouped.decode_prepared(frames, grouped.encode_support(support_dict(five[0])))
    reference = torch_scores(model, five[0], frames).argmax(1).numpy()
    assert_labels_vary(list(reference), min_labels=3)
    assert len(np.unique(reference)) >= 5  # groups (0, 1), (2, 3), (4, 0) all show up
    assert (labels == reference).mean() >= 0.999


def test_serve_refuses_a_flexible_export(flexible_export, capsys):
    """The serving protocol carries prototypes only: a way-flexible export is refused with
    one error line before Triton starts."""
    pytest.importorskip(
        "pytriton", reason="PyTriton is not installed: pip install './runtime[serve]'"
    )
    from mfnet_runtime import cli

    code = cli.main(["serve", "--engines", str(flexible_export[0]), "--device", "cpu"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "way-flexible" in err[-1]
