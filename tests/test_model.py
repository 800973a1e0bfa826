"""Contract tests of the MFNet model: shapes, gradients, the support/query split, errors."""

from __future__ import annotations

import urllib.error

import pytest
import torch

from mfnet.config import ModelConfig
from mfnet.model import backbone as backbone_module
from mfnet.model.build import build_mfnet, count_learnable_parameters
from mfnet.model.support import RelationalSupportAttention

SIZE = 48  # image side: features are 6 x 6, pyramid bins 6, 3, 2, 1


def tiny_config(**overrides) -> ModelConfig:
    values = dict(backbone="small", channels=16, image_size=SIZE, dropout=0.0)
    values.update(overrides)
    return ModelConfig(**values)


def support_batch(batch: int, way: int, shot: int, size: int = SIZE, seed: int = 0):
    """Random support images [B, N, K, 3, H, W] with a centred square mask per shot."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, way, shot, 3, size, size, generator=generator)
    masks = torch.zeros(batch, way, shot, size, size, dtype=torch.uint8)
    masks[..., size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    masks[..., size // 4, :] = 255  # an ignore band, as in VOC
    query = torch.rand(batch, 3, size, size, generator=generator)
    return images, masks, query


@pytest.mark.parametrize("way", [1, 2, 5])
@pytest.mark.parametrize("shot", [1, 5])
def test_output_shapes_and_finite(way: int, shot: int) -> None:
    torch.manual_seed(0)
    model = build_mfnet(tiny_config(way=way, shot=shot)).eval()
    images, masks, query = support_batch(2, way, shot)
    cache = model.encode_support(images, masks)
    assert cache.shot_features.shape == (2, way, shot, 16)
    assert cache.prototypes.shape == (2, way, 16)
    output = model.decode_query(query, cache, return_aux=True)
    assert output.logits.shape == (2, way + 1, SIZE, SIZE)
    assert output.feature_logits.shape == (2, way + 1, SIZE // 8, SIZE // 8)
    assert output.embedding.shape == (2, 16, SIZE // 8, SIZE // 8)
    assert torch.isfinite(output.logits).all()


def test_batched_episodes_equal_one_at_a_time() -> None:
    torch.manual_seed(0)
    model = build_mfnet(tiny_config(way=2, shot=5)).eval()
    images, masks, query = support_batch(3, 2, 5)
    batched = model(images, masks, query)  # 3 episodes, each with its own support set
    alone = torch.cat(
        [model(images[i : i + 1], masks[i : i + 1], query[i : i + 1]) for i in range(3)]
    )
    assert not torch.allclose(batched[0], batched[1], atol=1e-3)  # the episodes differ
    assert torch.allclose(batched, alone, atol=1e-5)
    # One support set broadcast over a batch of frames equals per-frame copies of it.
    single = model.encode_support(images[:1], masks[:1])
    broadcast = model.decode_query(query, single)
    repeated = model.decode_query(
        query, model.encode_support(images[:1].expand_as(images), masks[:1].expand_as(masks))
    )
    assert torch.allclose(broadcast, repeated, atol=1e-5)


def test_unbatched_support_and_cache_from_shots() -> None:
    torch.manual_seed(0)
    model = build_mfnet(tiny_config(way=2, shot=3)).eval()
    images, masks, query = support_batch(1, 2, 3)
    batched = model.encode_support(images, masks)
    unbatched = model.encode_support(images[0], masks[0])
    assert torch.equal(batched.prototypes, unbatched.prototypes)
    rebuilt = model.cache_from_shots(batched.shot_features)
    assert torch.equal(rebuilt.prototypes, batched.prototypes)


def test_every_learnable_parameter_gets_a_gradient() -> None:
    torch.manual_seed(0)
    for shot in (1, 3):  # A_S exists (and must learn) only for K > 1
        model = build_mfnet(tiny_config(way=2, shot=shot)).train()
        images, masks, query = support_batch(2, 2, shot)
        model(images, masks, query).square().mean().backward()
        for name, parameter in model.named_parameters():
            assert parameter.requires_grad, name  # the small trunk is trainable
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        assert (model.support_attention is not None) == (shot > 1)


def test_frozen_trunk_is_unchanged_by_a_training_step() -> None:
    torch.manual_seed(0)
    model = build_mfnet(
        ModelConfig(backbone="resnet50", weights="none", channels=32, image_size=64, way=2, shot=1)
    )
    model.train()
    assert not model.backbone.training, "a frozen trunk must stay in eval mode"
    assert model.neck.training
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(not p.requires_grad for p in model.backbone.parameters())
    optimizer = torch.optim.SGD(trainable, lr=0.1, momentum=0.9)
    images, masks, query = support_batch(2, 2, 1, size=64)
    model(images, masks, query).square().mean().backward()
    optimizer.step()
    after = model.backbone.state_dict()
    for key, value in before.items():  # weights and BN running statistics alike
        assert torch.equal(value, after[key]), key
    assert not hasattr(model.backbone, "layer4"), "layer4 must not exist (never computed)"


@pytest.mark.parametrize(
    "name, levels",
    [
        ("resnet50", [("layer2", 512), ("layer3", 1024)]),
        ("vgg16_bn", [("conv3", 256), ("conv4", 512)]),
        ("small", [("layer2", 64), ("layer3", 96)]),
    ],
)
def test_backbones_declare_their_levels_at_stride_8(name: str, levels) -> None:
    trunk = backbone_module.build_backbone(name, "none")
    assert [(level.name, level.channels) for level in trunk.feature_levels] == levels
    with torch.no_grad():
        outputs = trunk.eval()(torch.rand(1, 3, 64, 64))
    for output, level in zip(outputs, trunk.feature_levels, strict=True):
        assert level.stride == 8
        assert output.shape == (1, level.channels, 8, 8)
    for size in (473, 97, 48):  # the declared feature size is the real one
        with torch.no_grad():
            side = trunk(torch.rand(1, 3, size, size))[0].shape[-1]
        assert backbone_module.feature_size(name, size) == side, size


def test_support_attention_is_invariant_to_shot_order() -> None:
    torch.manual_seed(0)
    attention = RelationalSupportAttention(channels=16, heads=4)
    shots = torch.randn(2, 3, 5, 16)  # [B, N, K, C]
    permutation = torch.tensor([3, 0, 4, 1, 2])
    out = attention(shots)
    out_permuted = attention(shots[:, :, permutation])
    assert torch.allclose(out[:, :, permutation], out_permuted, atol=1e-6)
    assert torch.allclose(out.mean(2), out_permuted.mean(2), atol=1e-6)
    assert not torch.allclose(out, shots)  # it does modulate


def test_prototypes_invariant_to_shot_order_in_the_model() -> None:
    torch.manual_seed(0)
    model = build_mfnet(tiny_config(way=2, shot=4)).eval()
    images, masks, _ = support_batch(1, 2, 4)
    images[..., 0, :, :] += torch.linspace(0, 0.5, 4).view(1, 1, 4, 1, 1)  # distinct shots
    order = torch.tensor([2, 0, 3, 1])
    a = model.encode_support(images, masks).prototypes
    b = model.encode_support(images[:, :, order], masks[:, :, order]).prototypes
    assert torch.allclose(a, b, atol=1e-6)


def test_pyramid_bins_match_the_paper_at_473() -> None:
    model = build_mfnet(tiny_config())
    assert model.pyramid_bins(60) == [60, 30, 15, 8]
    assert build_mfnet(tiny_config(scale_attention=False)).pyramid_bins(60) == [60]


@pytest.mark.parametrize(
    "overrides",
    [
        dict(query_fusion="concat"),
        dict(class_fusion="add"),
        dict(scale_attention=False),
        dict(scale_attention_shared=True),
        dict(support_attention=False, shot=3),
    ],
)
def test_ablation_variants_build_and_run(overrides) -> None:
    torch.manual_seed(0)
    model = build_mfnet(tiny_config(**overrides)).eval()
    images, masks, query = support_batch(1, 2, model.config.shot)
    logits = model(images, masks, query)
    assert logits.shape == (1, 3, SIZE, SIZE) and torch.isfinite(logits).all()


def test_parameter_count_of_the_paper_configuration() -> None:
    """The number reported in the README: ResNet-50, 2-way, C = 256, per-scale A_M."""
    one_shot = count_learnable_parameters(build_mfnet(ModelConfig(weights="none")))
    five_shot = count_learnable_parameters(build_mfnet(ModelConfig(weights="none", shot=5)))
    assert one_shot["backbone"] == 0
    assert one_shot["total"] == 11_410_951
    assert five_shot["total"] - one_shot["total"] == 3 * (256 * 256 + 256)  # W_A, W_B, W_V


def test_empty_support_mask_is_a_clear_error() -> None:
    model = build_mfnet(tiny_config()).eval()
    images, masks, _ = support_batch(1, 2, 1)
    masks[0, 1, 0] = 0
    masks[0, 1, 0, :4] = 255  # only ignore pixels: still empty
    with pytest.raises(ValueError, match="class 1, shot 0.*no foreground"):
        model.encode_support(images, masks)


def test_object_vanishing_at_feature_resolution_is_a_clear_error() -> None:
    model = build_mfnet(tiny_config()).eval()
    images, masks, _ = support_batch(1, 2, 1)
    masks[0, 0, 0] = 0
    masks[0, 0, 0, 3, 3] = 1  # one pixel between the bilinear sample points
    with pytest.raises(ValueError, match="vanishes at feature resolution"):
        model.encode_support(images, masks)


def test_wrong_number_of_classes_is_a_clear_error() -> None:
    model = build_mfnet(tiny_config(way=2)).eval()
    images, masks, query = support_batch(1, 3, 1)
    cache = model.encode_support(images, masks)
    with pytest.raises(ValueError, match="3 classes but this model is 2-way"):
        model.decode_query(query, cache)


def test_mismatched_image_and_mask_sizes_are_a_clear_error() -> None:
    model = build_mfnet(tiny_config()).eval()
    images, masks, _ = support_batch(1, 2, 1)
    with pytest.raises(ValueError, match="do not match"):
        model.encode_support(images, masks[..., :-8, :])
    with pytest.raises(ValueError, match="do not match"):
        model.encode_support(images, masks[:, :1])
    with pytest.raises(ValueError, match=r"query must be \[B, 3, H, W\]"):
        model.decode_query(torch.rand(1, 1, SIZE, SIZE), model.encode_support(images, masks))


def test_missing_imagenet_weights_are_a_clear_error(monkeypatch, tmp_path) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(
        type(backbone_module.models.ResNet50_Weights.IMAGENET1K_V1), "get_state_dict", offline
    )
    with pytest.raises(backbone_module.WeightsUnavailableError, match="--weights /path/to"):
        backbone_module.build_backbone("resnet50", "imagenet")
    with pytest.raises(backbone_module.WeightsUnavailableError, match="does not exist"):
        backbone_module.build_backbone("resnet50", str(tmp_path / "missing.pth"))
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(backbone_module.WeightsUnavailableError, match="could not read"):
        backbone_module.build_backbone("resnet50", str(corrupt))


def test_weights_from_a_local_file(tmp_path) -> None:
    torch.manual_seed(0)
    reference = backbone_module.models.resnet50(weights=None)
    # A trimmed file (no layer4 / fc, which are never used) is accepted, with a DataParallel prefix.
    state = {
        f"module.{k}": v
        for k, v in reference.state_dict().items()
        if not k.startswith(("layer4.", "fc."))
    }
    path = tmp_path / "resnet50.pth"
    torch.save(state, path)
    trunk = backbone_module.build_backbone("resnet50", str(path))
    assert torch.equal(trunk.stem[0].weight, reference.conv1.weight)
    assert torch.equal(trunk.layer3[0].bn1.running_var, reference.layer3[0].bn1.running_var)
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, wrong)
    with pytest.raises(backbone_module.WeightsUnavailableError, match="do not fit"):
        backbone_module.build_backbone("resnet50", str(wrong))
