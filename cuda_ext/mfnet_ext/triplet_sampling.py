"""Typed Python API of the fused PML triplet sampler, ``torch.ops.mfnet_ext.sample_triplets``.

The specification is ``mfnet.ops.triplet_sampling.sample_triplets_reference``; the user-facing
front with the reference's argument checks, ``impl`` dispatch and generator handling is
``mfnet.ops.triplet_sampling.sample_triplets``. This module is the thin layer over the operator:

* ``sample_triplets(pred, target, num_classes, num_triplets, tau, spatial, seed, offset)``: the
  operator (CUDA kernel for CUDA tensors, bit-identical C++ twin for CPU tensors);
* ``seed_and_offset(generator, device)``: the (seed, offset) of one call, taken from a generator;
* ``philox_debug(counter, key)``: test hook, raw Philox4x32-10 blocks and their Gumbel variates;
* ``register_python_kernels()``: the fake (meta) kernels for torch.compile / FakeTensor.

Random numbers (csrc/philox.h, csrc/triplet_sampling.h): Philox4x32-10 keyed by a pseudorandom
function of the full 64-bit ``seed`` and 64-bit ``offset``; one 4-word block per (image b,
triplet t, pixel q) at counter (q, t, b, 0), whose words key the anchor, positive and negative
draws. Each draw is a masked argmax of independent keys (Gumbel-max; uniform 32-bit keys for the
uniform draws), ties to the lowest pixel index, so one (seed, offset) fixes the result on any
device, and the distribution is exactly the reference's.

There is no autograd: the outputs are indices and a mask, and the inputs are integer labels, so
nothing is differentiable (``torch.library.opcheck`` confirms the registration is consistent).
"""

from __future__ import annotations

import functools

import torch

from . import _loader

__all__ = ["philox_debug", "register_python_kernels", "sample_triplets", "seed_and_offset"]

_INT64_MIN, _UINT64 = -(2**63), 2**64


def sample_triplets(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    num_triplets: int,
    tau: float,
    spatial: bool,
    seed: int,
    offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw ``num_triplets`` (anchor, hard positive, hard negative) triplets per image.

    Args:
        pred: int64 [B, h, w], predicted labels 0..N (B, h, w >= 1; h * w < 2^32 - 1).
        target: int64 [B, h, w], ground truth 0..N or 255 (ignore), same device as ``pred``.
        num_classes: N >= 1. Anchors are pixels with 1 <= pred <= N and pred == target.
        num_triplets: T >= 1 anchors per image, drawn with replacement.
        tau: spatial temperature as a fraction of max(h, w) (> 0; used when ``spatial``).
        spatial: positive ~ softmax(-d / (tau * max(h, w))) over HP_n if True, else uniform.
        seed, offset: any integers in [-2^63, 2^64) (taken modulo 2^64); together they fix the
            draw on CPU and CUDA alike.
    Returns:
        anchor, positive, negative: int64 [B, T] flat indices y * w + x (0 where invalid);
        valid: bool [B, T], False where the anchor's HP_n or HN_n (or the anchor pool) is empty.
    The label VALUES are not checked here (that needs a device synchronisation; the front in
    ``mfnet.ops`` does it): any values are safe, labels are only compared, never used as
    addresses.
    """
    _ensure_loaded()
    return torch.ops.mfnet_ext.sample_triplets.default(
        pred,
        target,
        int(num_classes),
        int(num_triplets),
        float(tau),
        bool(spatial),
        _as_int64(seed),
        _as_int64(offset),
    )


def seed_and_offset(
    generator: torch.Generator | None, device: torch.device | str
) -> tuple[int, int]:
    """The (seed, offset) of one sampler call, consumed from ``generator``.

    ``generator=None`` means the default generator of ``device`` (torch's global RNG, which
    ``torch.manual_seed`` seeds). The generator must be on the tensors' device type, as
    ``torch.rand`` requires of the reference.

    * CUDA generators are Philox generators themselves: their state is (seed, offset), read
      without a device synchronisation. The call uses ``(initial_seed(), get_offset())`` and
      advances the offset by 4, as one of PyTorch's own random kernels would, so consecutive
      calls differ and ``get_state`` / ``set_state`` replays them. (Under CUDA-graph capture
      PyTorch refuses to read the offset; the sampler is not capturable.)
    * CPU generators (Mersenne Twister): one draw ``torch.randint(0, 2**63 - 1, (1,))`` is the
      seed; the offset is 0.

    Either way the generator's state fixes the result; the sampler's key is a pseudorandom
    function of both numbers, separated from the streams PyTorch itself derives from the seed.
    """
    device = torch.device(device)
    if generator is None:
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            generator = torch.cuda.default_generators[index]
        else:
            generator = torch.default_generator
    gen_device = generator.device
    if gen_device.type != device.type or (
        device.type == "cuda" and device.index is not None and gen_device.index != device.index
    ):
        raise RuntimeError(
            f"the generator is on {gen_device} but the labels are on {device}; pass a generator "
            "of the labels' device (as torch.rand requires)"
        )
    if gen_device.type == "cuda":
        seed = generator.initial_seed()
        offset = generator.get_offset()
        generator.set_offset(offset + 4)
        return seed, offset
    seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator, dtype=torch.int64).item())
    return seed, 0


def philox_debug(counter: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Test hook: Philox4x32-10 of each row, and the sampler's Gumbel variate of each word.

    Args:
        counter: int64 [n, 4], key: int64 [n, 2]; the low 32 bits of each entry are used.
    Returns:
        words: int64 [n, 4] in [0, 2^32); gumbel: float32 [n, 4], -log(-log(u)) with
        u = ((word >> 9) * 2 + 1) * 2^-24, computed with the kernel's own logarithm.
    """
    _ensure_loaded()
    return torch.ops.mfnet_ext.philox_debug.default(counter, key)


def _as_int64(value: int) -> int:
    """An integer modulo 2^64, as the signed int64 the schema takes (same 64 bits)."""
    value = int(value)
    if not _INT64_MIN <= value < _UINT64:
        raise ValueError(f"seed/offset must lie in [-2^63, 2^64), got {value}")
    return value - _UINT64 if value >= 2**63 else value


def _ensure_loaded() -> None:
    # torch.compile traces the operator call only; loading happens before (not traceable).
    if not torch.compiler.is_compiling():
        _loader.load()
        register_python_kernels()


# ------------------------------------------------------------------------------ fake kernels
def _sample_triplets_fake(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    num_triplets: int,
    tau: float,
    spatial: bool,
    seed: int,
    offset: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch._check(pred.dim() == 3, lambda: f"pred must be [B, h, w], got {tuple(pred.shape)}")
    torch._check(pred.shape == target.shape, lambda: "pred and target shapes differ")
    torch._check(
        pred.dtype == torch.int64 and target.dtype == torch.int64,
        lambda: "pred and target must be int64",
    )
    torch._check(num_triplets >= 1, lambda: f"num_triplets must be >= 1, got {num_triplets}")
    shape = (pred.shape[0], num_triplets)
    return (
        pred.new_empty(shape, dtype=torch.int64),
        pred.new_empty(shape, dtype=torch.int64),
        pred.new_empty(shape, dtype=torch.int64),
        pred.new_empty(shape, dtype=torch.bool),
    )


def _philox_debug_fake(
    counter: torch.Tensor, key: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    torch._check(counter.dim() == 2 and counter.shape[1] == 4, lambda: "counter must be [n, 4]")
    torch._check(key.dim() == 2 and key.shape[1] == 2, lambda: "key must be [n, 2]")
    n = counter.shape[0]
    return counter.new_empty((n, 4), dtype=torch.int64), counter.new_empty(
        (n, 4), dtype=torch.float32
    )


@functools.cache
def register_python_kernels() -> None:
    """Register the fake kernels (once per process; the library must be loaded). Called by
    ``sample_triplets`` / ``philox_debug`` on first use, and by the loader if it discovers this
    module."""
    torch.library.register_fake("mfnet_ext::sample_triplets", _sample_triplets_fake)
    torch.library.register_fake("mfnet_ext::philox_debug", _philox_debug_fake)
