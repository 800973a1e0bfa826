"""The fused masked global pooling of ``mfnet_ext`` against its reference, and its plumbing.

The specification is ``mfnet.ops.masked_pooling.masked_global_pool_reference``. The C++ CPU kernel
shares its per-element math (csrc/masked_pooling.h) with the CUDA kernel, so the CPU runs of
these tests (CI: the extension is compiled with the machine's nvcc) check the formulas that the
GPU runs; the same tests run on CUDA (marked ``cuda``, skipped without a GPU).

Tolerances: float32 kernel vs reference within 1e-5 relative / 1e-6 absolute (only the summation
order differs); float16 / bfloat16: the kernel's error against a float64 computation on the same
low-precision inputs is at most twice the reference's own error (flash-attention's rule).
"""

from __future__ import annotations

import logging
import sys

import pytest
import torch

import mfnet_ext
from mfnet.ops import extension as ext_dispatch
from mfnet.ops.masked_pooling import (
    EMPTY_MASK_EPS,
    masked_global_pool,
    masked_global_pool_reference,
    resize_mask,
)
from mfnet_ext import _loader

CUDA = pytest.param(
    "cuda",
    marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    ],
)
DEVICES = ["cpu", CUDA]

# (B, C, h, w, H, W): odd channel counts (1, 3, 257) for the tile remainders, feature sizes that
# do not divide the mask sizes, a single feature pixel (scale 0), upsampling (h > H), one row.
SHAPES = [
    (2, 1, 7, 5, 23, 17),
    (3, 3, 9, 11, 40, 33),
    (2, 257, 6, 4, 25, 19),
    (1, 4, 1, 1, 9, 9),
    (2, 3, 8, 8, 4, 4),
    (2, 5, 1, 7, 1, 9),
]
CUDA_SHAPES = [(4, 256, 60, 60, 473, 473), (3, 9, 61, 59, 473, 300)]  # paper size, odd sizes


def random_masks(b: int, height: int, width: int, seed: int, dtype=torch.bool) -> torch.Tensor:
    """[b, H, W] masks: a random rectangle per image plus sparse noise, never empty."""
    gen = torch.Generator().manual_seed(seed)
    masks = torch.rand(b, height, width, generator=gen) < 0.05
    for i in range(b):
        y0 = int(torch.randint(0, height, (1,), generator=gen))
        x0 = int(torch.randint(0, width, (1,), generator=gen))
        y1 = int(torch.randint(y0 + 1, height + 1, (1,), generator=gen))
        x1 = int(torch.randint(x0 + 1, width + 1, (1,), generator=gen))
        masks[i, y0:y1, x0:x1] = True
    return masks.to(dtype)


def random_features(shape: tuple[int, ...], seed: int, device: str, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)


def pool64(features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The reference's formula in float64 (same float32 resized weights): [B, C] float64."""
    weights = resize_mask(masks, tuple(features.shape[-2:])).double()  # [B, 1, h, w]
    area = weights.sum(dim=(2, 3)).clamp_min(EMPTY_MASK_EPS)  # [B, 1]
    return (features.double() * weights).sum(dim=(2, 3)) / area


# ------------------------------------------------------------------------------- correctness
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_the_reference_forward_and_backward(cuda_ext, device, mask_dtype, shape):
    b, c, h, w, height, width = shape
    features = random_features((b, c, h, w), seed=sum(shape), device=device).requires_grad_()
    masks = random_masks(b, height, width, seed=c, dtype=mask_dtype).to(device)
    out = mfnet_ext.masked_pooling.masked_global_pool(features, masks)
    expected = masked_global_pool_reference(features, masks)
    assert out.shape == (b, c) and out.dtype == features.dtype and out.device == features.device
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    grad_out = random_features((b, c), seed=7, device=device)
    (grad,) = torch.autograd.grad(out, features, grad_out)
    (expected_grad,) = torch.autograd.grad(expected, features, grad_out)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", CUDA_SHAPES)
def test_cuda_kernel_matches_the_reference_at_paper_sizes(cuda_ext, shape):
    b, c, h, w, height, width = shape
    features = random_features((b, c, h, w), seed=1, device="cuda").requires_grad_()
    masks = random_masks(b, height, width, seed=2).cuda()
    out = mfnet_ext.masked_pooling.masked_global_pool(features, masks)
    expected = masked_global_pool_reference(features, masks)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, features, grad_out)
    (expected_grad,) = torch.autograd.grad(expected, features, grad_out)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)
    # and the CUDA kernel agrees with the C++ CPU kernel (same per-element math)
    cpu = mfnet_ext.masked_pooling.masked_global_pool(features.detach().cpu(), masks.cpu())
    torch.testing.assert_close(out.detach().cpu(), cpu, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_masks_pool_to_zero_like_the_reference(cuda_ext, device):
    features = random_features((3, 5, 6, 7), seed=3, device=device).requires_grad_()
    masks = torch.zeros(3, 20, 22, dtype=torch.bool, device=device)
    masks[1, 4, 9] = True  # one pixel: a tiny but non-zero area at feature resolution
    out = mfnet_ext.masked_pooling.masked_global_pool(features, masks)
    expected = masked_global_pool_reference(features, masks)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[2], out[0])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(out.sum(), features)
    (expected_grad,) = torch.autograd.grad(expected.sum(), features)
    assert not grad[0].any() and not grad[2].any()
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_is_at_most_twice_the_references(cuda_ext, device, dtype):
    features = random_features((4, 67, 13, 11), seed=4, device=device, dtype=dtype)
    features.requires_grad_()
    masks = random_masks(4, 50, 47, seed=5).to(device)
    truth = pool64(features, masks)  # float64 on the same low-precision inputs
    out = mfnet_ext.masked_pooling.masked_global_pool(features, masks)
    expected = masked_global_pool_reference(features, masks)
    assert out.dtype == dtype
    kernel_error = (out.double() - truth).abs().max().item()
    reference_error = (expected.double() - truth).abs().max().item()
    assert kernel_error <= 2 * reference_error + 1e-6, (kernel_error, reference_error)

    grad_out = random_features((4, 67), seed=6, device=device, dtype=dtype)
    (grad,) = torch.autograd.grad(out, features, grad_out)
    (expected_grad,) = torch.autograd.grad(expected, features, grad_out)
    assert grad.dtype == dtype
    weights = resize_mask(masks, (13, 11)).double()  # [B, 1, h, w]
    area = weights.sum(dim=(2, 3), keepdim=True).clamp_min(EMPTY_MASK_EPS)
    grad_truth = grad_out.double()[:, :, None, None] / area * weights  # [B, C, h, w]
    kernel_error = (grad.double() - grad_truth).abs().max().item()
    reference_error = (expected_grad.double() - grad_truth).abs().max().item()
    assert kernel_error <= 2 * reference_error + 1e-6, (kernel_error, reference_error)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_in_float64(cuda_ext, device):
    features = random_features((2, 3, 4, 5), seed=8, device=device, dtype=torch.float64)
    features.requires_grad_()
    masks = random_masks(2, 9, 7, seed=9).to(device)

    def pool(x: torch.Tensor) -> torch.Tensor:
        return mfnet_ext.masked_pooling.masked_global_pool(x, masks)

    assert torch.autograd.gradcheck(pool, (features,))
    assert torch.autograd.gradgradcheck(pool, (features,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(cuda_ext, device, requires_grad):
    features = random_features((2, 3, 5, 6), seed=10, device=device).requires_grad_(requires_grad)
    for masks in (random_masks(2, 11, 13, seed=11), random_masks(2, 11, 13, 12, torch.float32)):
        torch.library.opcheck(
            torch.ops.mfnet_ext.masked_global_pool.default, (features, masks.to(device))
        )
    grad_pooled = random_features((2, 3), seed=13, device=device).requires_grad_(requires_grad)
    torch.library.opcheck(
        torch.ops.mfnet_ext.masked_global_pool_backward.default,
        (grad_pooled, random_masks(2, 11, 13, seed=14).to(device), 5, 6),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(cuda_ext, device):
    features = random_features((5, 33, 17, 19), seed=15, device=device).requires_grad_()
    masks = random_masks(5, 70, 65, seed=16).to(device)
    runs = []
    for _ in range(3):
        out = mfnet_ext.masked_pooling.masked_global_pool(features, masks)
        (grad,) = torch.autograd.grad(out.sum(), features)
        runs.append((out, grad))
    for out, grad in runs[1:]:
        assert torch.equal(out, runs[0][0]) and torch.equal(grad, runs[0][1])


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_and_empty_inputs(cuda_ext, device):
    features = random_features((3, 8, 9, 10), seed=17, device=device)
    masks = random_masks(3, 30, 31, seed=18).to(device)
    channels_last = features.to(memory_format=torch.channels_last)
    torch.testing.assert_close(
        mfnet_ext.masked_pooling.masked_global_pool(channels_last, masks),
        masked_global_pool_reference(features, masks),
        rtol=1e-5,
        atol=1e-6,
    )
    transposed_masks = masks.transpose(1, 2).contiguous().transpose(1, 2)
    torch.testing.assert_close(
        mfnet_ext.masked_pooling.masked_global_pool(features, transposed_masks),
        masked_global_pool_reference(features, masks),
        rtol=1e-5,
        atol=1e-6,
    )
    assert mfnet_ext.masked_pooling.masked_global_pool(features[:0], masks[:0]).shape == (0, 8)
    assert mfnet_ext.masked_pooling.masked_global_pool(features[:, :0], masks).shape == (3, 0)
    empty_grad = mfnet_ext.masked_pooling.masked_global_pool_backward(
        features[:0, :, 0, 0], masks[:0], 9, 10
    )
    assert empty_grad.shape == (0, 8, 9, 10)


def side_stream_results(run, outputs_like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Run ``run()`` on a side stream while the default stream sleeps, and copy its outputs to
    pinned host memory on that side stream.

    The side stream (created non-blocking by PyTorch) does not wait for the default stream. A
    kernel launched on the current (side) stream has finished when the side stream's copies
    run; a kernel launched on the default stream instead would still be queued behind the sleep,
    so the copies would read unwritten memory. The default stream must still be busy when the
    side stream is done, or the check proves nothing.
    """
    torch.cuda.synchronize()  # inputs are ready before the default stream starts sleeping
    side = torch.cuda.Stream()
    hosts = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in outputs_like]
    torch.cuda._sleep(2_000_000_000)  # about a second on the default stream
    with torch.cuda.stream(side):
        outputs = run()
        for host, out in zip(hosts, outputs, strict=True):
            host.copy_(out, non_blocking=True)
        done = torch.cuda.Event()
        done.record(side)
    done.synchronize()
    default_busy = not torch.cuda.default_stream().query()
    torch.cuda.synchronize()
    assert default_busy, "the default stream's sleep ended first: the check proves nothing"
    return hosts


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_kernels_run_on_the_current_stream(cuda_ext):
    features = random_features((8, 64, 60, 60), seed=19, device="cuda")
    masks = random_masks(8, 473, 473, seed=20).cuda()
    grad = random_features((8, 64), seed=21, device="cuda")
    expected = masked_global_pool_reference(features, masks)
    expected_grad = masked_global_pool_reference(features.requires_grad_(), masks)
    (expected_grad,) = torch.autograd.grad(expected_grad, features, grad)
    features = features.detach()

    def run():
        return [
            mfnet_ext.masked_pooling.masked_global_pool(features, masks),
            mfnet_ext.masked_pooling.masked_global_pool_backward(grad, masks, 60, 60),
        ]

    out, grad_features = side_stream_results(run, [expected, expected_grad])
    torch.testing.assert_close(out, expected.cpu(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_features, expected_grad.cpu(), rtol=1e-5, atol=1e-7)


def test_torch_compile_fullgraph(cuda_ext):
    features = random_features((2, 6, 5, 7), seed=21, device="cpu").requires_grad_()
    masks = random_masks(2, 16, 19, seed=22)

    def loss(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return (mfnet_ext.masked_pooling.masked_global_pool(x * 2, m) ** 2).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    (grad,) = torch.autograd.grad(compiled(features, masks), features)
    (expected,) = torch.autograd.grad(loss(features, masks), features)
    torch.testing.assert_close(grad, expected)


# ---------------------------------------------------------------------------- input checks
@pytest.mark.parametrize(
    ("features", "masks", "message"),
    [
        (torch.zeros(2, 3, 4), torch.zeros(2, 8, 8), r"features must be \[B, C, h, w\]"),
        (torch.zeros(2, 3, 4, 4), torch.zeros(2, 8), r"masks must be \[B, H, W\]"),
        (torch.zeros(2, 3, 4, 4), torch.zeros(3, 8, 8), "same B"),
        (torch.zeros(2, 3, 4, 4, dtype=torch.int64), torch.zeros(2, 8, 8), "float32, float16"),
        (torch.zeros(2, 3, 4, 4), torch.zeros(2, 8, 8, dtype=torch.complex64), "masks must be"),
        (torch.zeros(2, 3, 0, 4), torch.zeros(2, 8, 8), "non-empty"),
        (torch.zeros(2, 3, 4, 4), torch.zeros(2, 0, 8), "non-empty"),
    ],
)
def test_bad_inputs_are_clear_errors(cuda_ext, features, masks, message):
    with pytest.raises(RuntimeError, match=message):
        mfnet_ext.masked_pooling.masked_global_pool(features, masks)


def test_bad_backward_inputs_are_clear_errors(cuda_ext):
    masks = torch.ones(2, 8, 8, dtype=torch.bool)
    with pytest.raises(RuntimeError, match=r"grad_pooled must be \[B, C\]"):
        mfnet_ext.masked_pooling.masked_global_pool_backward(torch.zeros(2, 3, 1), masks, 4, 4)
    with pytest.raises(RuntimeError, match="same B"):
        mfnet_ext.masked_pooling.masked_global_pool_backward(torch.zeros(3, 3), masks, 4, 4)
    with pytest.raises(RuntimeError, match="non-empty"):
        mfnet_ext.masked_pooling.masked_global_pool_backward(torch.zeros(2, 3), masks, 0, 4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mixed_devices_are_a_clear_error(cuda_ext):
    with pytest.raises(RuntimeError, match="same device"):
        mfnet_ext.masked_pooling.masked_global_pool(
            torch.zeros(2, 3, 4, 4, device="cuda"), torch.ones(2, 8, 8, dtype=torch.bool)
        )


@pytest.mark.parametrize("impl", ["auto", "reference", "cuda"])
def test_front_checks_shapes_and_impl_before_dispatching(monkeypatch, impl):
    monkeypatch.setattr(mfnet_ext, "load", _must_not_load)
    with pytest.raises(ValueError, match="same B"):
        masked_global_pool(torch.zeros(2, 3, 4, 4), torch.zeros(3, 8, 8), impl=impl)
    with pytest.raises(ValueError, match="impl must be one of"):
        masked_global_pool(torch.zeros(2, 3, 4, 4), torch.zeros(2, 8, 8), impl="triton")


# ------------------------------------------------------------------------ impl= dispatching
def _must_not_load(*args, **kwargs):
    raise AssertionError("the extension must not be loaded here")


@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_auto_and_reference_on_cpu_are_exactly_the_reference(monkeypatch, impl):
    monkeypatch.setattr(mfnet_ext, "load", _must_not_load)
    features = random_features((2, 4, 6, 5), seed=23, device="cpu")
    masks = random_masks(2, 21, 18, seed=24)
    assert torch.equal(
        masked_global_pool(features, masks, impl=impl),
        masked_global_pool_reference(features, masks),
    )


def test_cuda_impl_on_cpu_tensors_runs_the_cpu_kernel(cuda_ext, monkeypatch):
    calls = []
    kernel = mfnet_ext.masked_pooling.masked_global_pool

    def spy(features, masks):
        calls.append(features.shape)
        return kernel(features, masks)

    monkeypatch.setattr(mfnet_ext.masked_pooling, "masked_global_pool", spy)
    features = random_features((2, 4, 6, 5), seed=25, device="cpu")
    masks = random_masks(2, 21, 18, seed=26)
    out = masked_global_pool(features, masks, impl="cuda")
    assert calls == [features.shape]
    torch.testing.assert_close(
        out, masked_global_pool_reference(features, masks), rtol=1e-5, atol=1e-6
    )


def test_cuda_impl_fails_loudly_when_the_extension_is_unavailable(monkeypatch):
    def unavailable(*args, **kwargs):
        raise mfnet_ext.ExtensionUnavailable("no CUDA compiler: /nowhere/bin/nvcc does not exist")

    monkeypatch.setattr(mfnet_ext, "load", unavailable)
    features, masks = torch.zeros(1, 2, 3, 3), torch.ones(1, 6, 6, dtype=torch.bool)
    with pytest.raises(RuntimeError, match=r"impl='cuda'.*nvcc does not exist.*mfnet_ext build"):
        masked_global_pool(features, masks, impl="cuda")
    assert torch.equal(
        masked_global_pool(features, masks, impl="auto"),
        masked_global_pool_reference(features, masks),
    )


def test_auto_on_a_gpu_falls_back_to_the_reference_with_one_warning(monkeypatch, caplog):
    def unavailable(*args, **kwargs):
        raise mfnet_ext.ExtensionUnavailable("simulated build failure 8d1f")

    monkeypatch.setattr(mfnet_ext, "load", unavailable)
    ext_dispatch._warn_fallback.cache_clear()
    with caplog.at_level(logging.WARNING, logger="mfnet.ops.extension"):
        assert ext_dispatch.extension_for("auto", torch.device("cuda")) is None
        assert ext_dispatch.extension_for("auto", torch.device("cuda")) is None
    warnings = [r for r in caplog.records if "simulated build failure 8d1f" in r.getMessage()]
    assert len(warnings) == 1 and "reference" in warnings[0].getMessage()
    with pytest.raises(RuntimeError, match="simulated build failure 8d1f"):
        ext_dispatch.extension_for("cuda", torch.device("cuda"))


def test_without_the_package_cuda_fails_and_auto_falls_back(monkeypatch):
    monkeypatch.setitem(sys.modules, "mfnet_ext", None)  # import mfnet_ext raises ImportError
    ext_dispatch._warn_fallback.cache_clear()
    assert ext_dispatch.extension_for("auto", torch.device("cuda")) is None
    assert ext_dispatch.extension_for("reference", torch.device("cuda")) is None
    with pytest.raises(RuntimeError, match="mfnet_ext is not importable"):
        ext_dispatch.extension_for("cuda", torch.device("cpu"))


# ----------------------------------------------------------------------------------- loader
def test_loader_names_a_missing_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    if not torch.version.cuda:
        pytest.skip("this torch is not a CUDA build (another message applies)")
    with pytest.raises(mfnet_ext.ExtensionUnavailable, match=r"bin/nvcc does not exist.*CUDA_HOME"):
        _loader._build(tmp_path / "build", verbose=False)


def test_loader_without_a_built_library_and_no_compile_names_the_build_command(
    monkeypatch, tmp_path
):
    monkeypatch.setattr(_loader, "is_loaded", lambda: False)
    monkeypatch.setattr(_loader, "_import_aot", lambda: None)
    with pytest.raises(mfnet_ext.ExtensionUnavailable, match="python -m mfnet_ext build"):
        _loader._load(False, str(tmp_path), False)


def test_loader_memoises_failures(monkeypatch):
    calls = []

    def failing(compile, root, verbose):
        calls.append(root)
        raise mfnet_ext.ExtensionUnavailable("simulated")

    monkeypatch.setattr(_loader, "_load", failing)
    _loader.reset()
    try:
        for _ in range(3):
            with pytest.raises(mfnet_ext.ExtensionUnavailable, match="simulated"):
                mfnet_ext.load(build_root="/nonexistent/mfnet_ext_root")
        assert len(calls) == 1
    finally:
        _loader.reset()


def test_build_directory_follows_the_sources_and_the_environment(monkeypatch, tmp_path):
    source = tmp_path / "op.cu"
    source.write_text("// v1\n")
    monkeypatch.setattr(_loader, "_hashed_files", lambda: [source])
    monkeypatch.setenv("MFNET_EXT_BUILD_DIR", str(tmp_path / "root"))
    first = _loader.build_directory()
    assert first.parent == (tmp_path / "root").resolve()
    assert first.name.startswith(torch.__version__)
    source.write_text("// v2\n")
    assert _loader.build_directory() != first
    assert _loader.build_directory(tmp_path / "other").parent == (tmp_path / "other").resolve()


def test_loader_finds_every_source():
    names = {path.name for path in mfnet_ext.sources()}
    assert {"registration.cpp", "masked_pooling.cu", "masked_pooling_cpu.cpp"} <= names


def test_cli_info_and_build_errors(monkeypatch, capsys):
    from mfnet_ext.__main__ import main

    assert main(["info"]) == 0
    assert '"arch_list"' in capsys.readouterr().out

    def unavailable(*args, **kwargs):
        raise mfnet_ext.ExtensionUnavailable("no CUDA compiler (simulated)")

    monkeypatch.setattr(_loader, "load", unavailable)
    assert main(["build"]) == 2
    assert "no CUDA compiler (simulated)" in capsys.readouterr().err


def test_cli_build_reports_the_operators(cuda_ext, capsys):
    from mfnet_ext.__main__ import main

    assert main(["build"]) == 0
    assert "masked_global_pool" in capsys.readouterr().out


# --------------------------------------------------------------------------------- training
def _train_losses(config) -> list[float]:
    from mfnet.training.logs import read_log
    from mfnet.training.loop import train

    _, checkpoint = train(config, progress=False)
    return [float(row["loss"]) for row in read_log(checkpoint.parent / "log.csv")]


def test_cpu_training_runs_the_cpp_kernels_only_when_selected(
    cuda_ext, tiny_config, tmp_path, monkeypatch
):
    """ops="cuda" on the CPU trains through the extension's C++ CPU pooling kernel (its calls are
    counted) and matches the reference run; ops="auto" on the CPU never calls it."""
    import mfnet_ext

    calls = []
    kernel = mfnet_ext.masked_pooling.masked_global_pool
    monkeypatch.setattr(
        mfnet_ext.masked_pooling,
        "masked_global_pool",
        lambda *args: calls.append(args[0].device.type) or kernel(*args),
    )
    base = tiny_config.replace(device="cpu", pml_mode="off", dropout=0.0)
    selected = _train_losses(base.replace(ops="cuda", out=str(tmp_path / "cuda")))
    assert calls and set(calls) == {"cpu"}  # the C++ CPU kernel ran on every pooling call
    calls.clear()
    reference = _train_losses(base.replace(ops="reference", out=str(tmp_path / "ref")))
    auto = _train_losses(base.replace(ops="auto", out=str(tmp_path / "auto")))
    assert not calls
    assert len(selected) == len(reference) == 4 and selected != [selected[0]] * 4
    torch.testing.assert_close(
        torch.tensor(selected), torch.tensor(reference), rtol=1e-4, atol=1e-6
    )
    assert auto == reference  # "auto" on the CPU is the reference, bit for bit


@pytest.mark.parametrize("device", DEVICES)
def test_training_with_ops_cuda_matches_the_reference(cuda_ext, tiny_config, tmp_path, device):
    """A short run with the extension (the CUDA kernels on a GPU, the C++ CPU kernels on the CPU)
    against the references. PML is off for the comparison, because the fused sampler draws other
    (equally distributed) triplets than the reference; only the pooling then differs, by float32
    summation order, which after 4 SGD steps moves the losses by far less than the tolerance:
    1e-4 relative on the CPU, 1e-3 on a GPU (where cuDNN's TF32 convolutions and non-deterministic
    backward kernels add their own run-to-run noise). A second run with PML on checks that the
    fused sampler trains."""
    base = tiny_config.replace(device=device, pml_mode="off", dropout=0.0)
    fused = _train_losses(base.replace(ops="cuda", out=str(tmp_path / "cuda")))
    reference = _train_losses(base.replace(ops="reference", out=str(tmp_path / "ref")))
    assert len(fused) == len(reference) == 4
    rtol = 1e-4 if device == "cpu" else 1e-3
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(reference), rtol=rtol, atol=1e-6)
    with_pml = _train_losses(
        tiny_config.replace(device=device, ops="cuda", out=str(tmp_path / "pml"))
    )
    assert all(torch.isfinite(torch.tensor(with_pml)))


def test_configs_saved_before_the_ops_field_load_with_the_default():
    from mfnet.config import Config

    saved = Config().replace(ops="reference").to_dict()
    assert saved["train"]["ops"] == "reference"
    del saved["train"]["ops"]  # a checkpoint written before the field existed
    assert Config.from_dict(saved).train.ops == "auto"
    with pytest.raises(ValueError, match="ops="):
        Config().replace(ops="triton")
