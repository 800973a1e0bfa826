"""The PyTorch rows: the full model, ``decode_query`` and the optimised decoder (eager, AMP,
channels_last, CUDA graph, torch.compile), the naive N x 1-way, PyTorch end to end, and the
torch support-set encoders. Each builder returns a ``Prepared`` row whose call gives labels
uint8 [B, S, S]."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from mfnet.model.mfnet import MFNet
from mfnet.model.naive import NaiveMultiWay
from mfnet.model.support import EncodedSupport, RelationalSupportAttention

from .context import Env, Prepared
from .workload import WayContext, make_fast_decoder, plain_labels


def no_grad(fn: Callable) -> Callable:
    """``fn`` run under ``torch.no_grad()``."""

    def run(*inputs):
        """``fn(*inputs)`` without autograd."""
        with torch.no_grad():
            return fn(*inputs)

    return run


def with_autocast(fn: Callable, device: torch.device, precision: str) -> Callable:
    """``fn`` under autocast to ``precision`` (fp16 / bf16); fp32 returns ``fn`` itself."""
    if precision == "fp32":
        return fn
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16

    def run(*inputs):
        """``fn(*inputs)`` under autocast."""
        # cache_enabled=False: autocast's weight cache must not outlive a CUDA graph capture
        with torch.autocast(device.type, dtype=dtype, cache_enabled=False):
            return fn(*inputs)

    return run


def capture_graph(fn: Callable, *static_inputs: torch.Tensor) -> tuple[Callable, int]:
    """Capture ``fn(*static_inputs)`` as a CUDA graph after warm-up on a side stream; returns
    (replay -> the static output, bytes of the graph's memory pool at capture)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(*static_inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    before = torch.cuda.memory_allocated()
    with torch.cuda.graph(graph):
        output = fn(*static_inputs)
    pool = torch.cuda.memory_allocated() - before

    def replay() -> torch.Tensor:
        """Replay the captured graph; its output tensor is overwritten in place."""
        graph.replay()
        return output

    replay.graph = graph  # keep it alive as long as the callable
    return replay, pool


def channels_last(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` [B, C, H, W] in channels_last memory layout."""
    return tensor.contiguous(memory_format=torch.channels_last)


def model_copy(model: nn.Module, memory_format: bool = False) -> nn.Module:
    """A deep copy of ``model`` (each row owns its weights), channels_last if ``memory_format``."""
    copied = copy.deepcopy(model)
    return copied.to(memory_format=torch.channels_last) if memory_format else copied


def fast_labels(
    decoder: nn.Module, prototypes: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The optimised decoder with its prototype terms prepared once (on the first call, so in
    the row's precision), as a deployment caches them with the support set.

    query float [B, 3, S, S] -> labels uint8 [B, S, S]; prototypes [1, N, C]."""
    state: dict[str, Any] = {}

    def run(query: torch.Tensor) -> torch.Tensor:
        """Labels of ``query`` (prototype terms prepared on the first call)."""
        if "prototypes" not in state:
            state["prototypes"] = decoder.prepare(prototypes) if decoder.folded else prototypes
        return decoder(query, state["prototypes"]).argmax(dim=1).to(torch.uint8)

    return run


def naive_labels(
    model: MFNet, caches: list[EncodedSupport]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A 1-way model run once per class; per pixel the most probable label over the runs
    (any run's background included), as ``NaiveMultiWay`` and the paper do.

    query float [B, 3, S, S] -> labels uint8 [B, S, S]; one 1-way cache per class."""

    def run(query: torch.Tensor) -> torch.Tensor:
        """Labels of ``query`` from N 1-way passes."""
        probs = [torch.softmax(model.decode_query(query, cache).float(), dim=1) for cache in caches]
        background = torch.stack([p[:, 0] for p in probs], dim=1).amax(dim=1, keepdim=True)
        scores = torch.cat([background] + [p[:, 1:2] for p in probs], dim=1)
        return scores.argmax(dim=1).to(torch.uint8)

    return run


def decoder_fn(
    env: Env, ctx: WayContext, kind: str, precision: str, layout: bool
) -> Callable[[torch.Tensor], torch.Tensor]:
    """labels(query) for the plain decoder (``plain``), the optimised one (``opt``) or the naive
    N x 1-way (``naive``), on a model copy, without autograd, at ``precision``."""
    if kind == "opt":
        model = model_copy(ctx.model, layout)
        fn = fast_labels(make_fast_decoder(model).to(env.device), ctx.prototypes)
    elif kind == "naive":
        fn = naive_labels(model_copy(ctx.naive, layout), ctx.naive_caches)
    else:
        fn = plain_labels(model_copy(ctx.model, layout), ctx.cache)
    return no_grad(with_autocast(fn, env.device, precision))


def torch_decoder_row(
    env: Env, ctx: WayContext, batch: int, kind: str, precision: str, layout: bool, graph: bool
) -> Prepared:
    """A decoder row on the first ``batch`` frames (already on the device), eager or replayed
    as a CUDA graph (``graph``), channels_last if ``layout``."""
    query = ctx.data["frames"][:batch].clone()
    if layout:
        query = channels_last(query)
    fn = decoder_fn(env, ctx, kind, precision, layout)
    if graph:
        replay, _ = capture_graph(fn, query)
        return Prepared(replay)
    return Prepared(lambda: fn(query))


def full_row(env: Env, ctx: WayContext, batch: int, naive: bool) -> Prepared:
    """Support + query every frame, one support set per frame (as the paper times it)."""
    images = ctx.data["support_images"][:, :1]
    masks = ctx.data["support_masks"][:, :1]
    images = images.unsqueeze(0).expand(batch, *images.shape).contiguous()  # [B, N, 1, 3, S, S]
    masks = masks.unsqueeze(0).expand(batch, *masks.shape).contiguous()  # [B, N, 1, S, S]
    query = ctx.data["frames"][:batch].clone()
    model = NaiveMultiWay(model_copy(ctx.naive)) if naive else model_copy(ctx.model)
    run = no_grad(lambda: model(images, masks, query).argmax(dim=1).to(torch.uint8))
    return Prepared(run)


def e2e_torch_row(env: Env, ctx: WayContext, batch: int) -> Prepared:
    """uint8 [B, S, S, 3] numpy frames -> uint8 [B, S, S] numpy labels through PyTorch.

    CUDA: host memcpy into a pinned buffer, async copy to the device, normalisation + the
    optimised decoder (AMP FP16, channels_last) + argmax replayed as one CUDA graph, async copy
    of the labels into pinned memory, synchronise, copy out. CPU: eager FP32.
    """
    host = ctx.data["frames_np"][:batch]
    size = env.args.size
    notes = ["decoder: FastQueryDecoder"]
    if not env.cuda:
        fn = decoder_fn(env, ctx, "opt", "fp32", False)

        def call_cpu() -> np.ndarray:
            """Host frames -> host labels, eager FP32."""
            query = torch.from_numpy(host).permute(0, 3, 1, 2).float().div(255)
            return fn(query).numpy()

        return Prepared(call_cpu, notes=notes)
    fn = decoder_fn(env, ctx, "opt", "fp16", True)
    pinned_in = torch.empty((batch, size, size, 3), dtype=torch.uint8).pin_memory()
    pinned_out = torch.empty((batch, size, size), dtype=torch.uint8).pin_memory()
    device_in = torch.empty((batch, size, size, 3), dtype=torch.uint8, device=env.device)
    # NHWC uint8 permuted to NCHW is already channels_last in memory.
    replay, _ = capture_graph(
        lambda frames: fn(frames.permute(0, 3, 1, 2).float().div(255)), device_in
    )
    in_view, out_view = pinned_in.numpy(), pinned_out.numpy()
    stream = torch.cuda.current_stream()

    def call() -> np.ndarray:
        """Host frames -> pinned -> device -> graph replay -> pinned -> host labels."""
        np.copyto(in_view, host)
        device_in.copy_(pinned_in, non_blocking=True)
        labels = replay()
        pinned_out.copy_(labels, non_blocking=True)
        stream.synchronize()
        return out_view.copy()

    return Prepared(call, notes=notes)


def compile_row(env: Env, ctx: WayContext, batch: int, kind: str, graph: bool) -> Prepared:
    """torch.compile (default mode, static shapes) of the AMP FP16 channels_last decoder; the
    CUDA-graph row captures the compiled function of the row before it (compiled once)."""
    key = (ctx.way, batch, kind)
    query = channels_last(ctx.data["frames"][:batch].clone())
    entry = env.compiled.get(key)
    resident = 0
    if entry is None:
        torch._dynamo.reset()
        fn = decoder_fn(env, ctx, kind, "fp16", True)
        fn(query)  # eager once: prepares cached prototype terms outside the compiled region
        compiled = torch.compile(fn, dynamic=False)
        started = time.perf_counter()
        compiled(query)
        if env.cuda:
            torch.cuda.synchronize()
        entry = {"fn": compiled, "compile_s": time.perf_counter() - started}
        env.compiled[key] = entry
    else:
        resident = (ctx.params["model"] if kind != "naive" else ctx.params["naive"]) * 4
    notes = [f"compile time {entry['compile_s']:.1f} s (excluded)"]
    if graph:
        replay, _ = capture_graph(entry["fn"], query)
        env.compiled.pop(key, None)
        return Prepared(
            replay, resident_bytes=resident, notes=notes, extra={"compile_s": entry["compile_s"]}
        )
    return Prepared(
        lambda: entry["fn"](query),
        resident_bytes=resident,
        notes=notes,
        extra={"compile_s": entry["compile_s"]},
    )


def torch_support_row(env: Env, ctx: WayContext, shots: int, precision: str) -> Prepared:
    """``encode_support`` of N classes x ``shots`` (support images [N, K, 3, S, S]) at
    ``precision``; with K > 1 the model gets the A_S module a K-shot model has."""
    model = model_copy(ctx.model)
    if shots > 1:  # A_S as a K-shot model has it (a 1-shot model only averages)
        model.support_attention = (
            RelationalSupportAttention(ctx.config.model.channels, ctx.config.model.relation_heads)
            .to(env.device)
            .eval()
            .requires_grad_(False)
        )
    images = ctx.data["support_images"][:, :shots].contiguous()
    masks = ctx.data["support_masks"][:, :shots].contiguous()
    fn = no_grad(
        with_autocast(lambda: model.encode_support(images, masks).prototypes, env.device, precision)
    )
    return Prepared(fn, notes=["A_S included" if shots > 1 else "K = 1: no A_S"])
