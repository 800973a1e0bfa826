"""Every GPU path outside the extension kernels, on a real GPU (marked ``cuda``).

- ONNX Runtime's CUDA provider through IOBinding, with and without CUDA graphs, against the CPU
  provider, on fresh random frames every call, in the order B, B', B (graph batch, another
  batch, graph batch again: a replay that read stale frames or frozen shapes shows);
- TensorRT engines built here, against ONNX Runtime, for every role at the profile's minimum,
  optimal and maximum sizes (batch 1 / opt / max, K = the profile minimum), with a captured
  decoder batch interleaved with other batches;
- ``close()`` of both backends gives the device memory back (``cudaMemGetInfo``);
- fp16 autocast training with a GradScaler; an exact resume of the CUDA RNG streams; data
  parallel training with NCCL at world size 1.

Each test skips with its reason where the GPU, onnxruntime-gpu or TensorRT is missing; none of
them has run on a GPU yet (the development machines have none). The same backend code runs on
the CPU against fakes with device semantics in ``test_runtime_gpu_backends.py``.
"""

from __future__ import annotations

import gc
import importlib.util
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
try:
    import mfnet_runtime  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT / "runtime"))

import onnxruntime  # noqa: E402

from mfnet_runtime import Segmenter  # noqa: E402
from mfnet_runtime.backends import open_backend  # noqa: E402
from mfnet_runtime.manifest import read_manifest  # noqa: E402
from runtime_fixtures import export_varied  # noqa: E402

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
needs_ort_cuda = pytest.mark.skipif(
    "CUDAExecutionProvider" not in onnxruntime.get_available_providers(),
    reason="needs onnxruntime-gpu (ONNX Runtime's CUDA provider); the CPU build is installed",
)
needs_tensorrt = pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is None,
    reason="tensorrt is not importable (TensorRT is not installed on this machine)",
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """2-way export of a 2-shot model (multi-shot aggregator: K >= 2), labels varied."""
    return export_varied(tmp_path_factory.mktemp("gpu"), 2, 2)[0]


def random_frames(rng: np.random.Generator, batch: int, size: int = 48) -> np.ndarray:
    return rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)


def prototypes_of(reference) -> np.ndarray:
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (4, 48, 48, 3), dtype=np.uint8)
    masks = np.zeros((4, 48, 48), np.uint8)
    masks[:, 8:40, 10:34] = 1
    features = reference.run_support_encoder(images, masks).reshape(2, 2, -1)  # [N, K, C]
    return reference.run_aggregator(features)


def compare_decoders(ours, reference, batches: list[int], atol: float) -> None:
    """Fresh frames every call; labels agree (>= 99.9 %) and probabilities within ``atol``."""
    rng = np.random.default_rng(0)
    prototypes = prototypes_of(reference)
    seen = []
    for batch in batches:
        frames = random_frames(rng, batch)
        labels, probabilities = ours.run_decoder(frames, prototypes, with_probabilities=True)
        want_labels, want_probabilities = reference.run_decoder(frames, prototypes, True)
        assert len(np.unique(want_labels)) >= 2  # several classes: agreement means something
        np.testing.assert_allclose(probabilities, want_probabilities, atol=atol)
        assert (labels == want_labels).mean() >= 0.999, batch
        only_labels, _ = ours.run_decoder(frames, prototypes)  # labels alone: other bindings
        assert (only_labels == want_labels).mean() >= 0.999, batch
        seen.append(want_labels[0])
    assert not np.array_equal(seen[0], seen[1])  # the calls' frames differ


# ------------------------------------------------------------------------- ONNX Runtime CUDA
@needs_ort_cuda
@pytest.mark.parametrize("graph_batch", [0, 2], ids=["iobinding", "cuda-graph"])
def test_onnxruntime_cuda_against_the_cpu_provider(exported, graph_batch) -> None:
    manifest = read_manifest(exported)
    reference = open_backend(manifest, "onnxruntime", "cpu", "fp32")
    ours = open_backend(manifest, "onnxruntime", "cuda", "fp32", cuda_graph_batch=graph_batch)
    assert ours.name == "onnxruntime-cuda"
    if graph_batch:
        assert ours._graph_decoder is not None and ours._graph_decoder.batch == 2
    compare_decoders(ours, reference, [2, 3, 2, 1, 2], atol=1e-4)  # B, B', B, ...
    if graph_batch:
        assert ours._graph_decoder is not None  # the replays worked (a failure disables it)
    ours.close()


# --------------------------------------------------------------------------------- TensorRT
@pytest.fixture(scope="module")
def trt_engines(exported, tmp_path_factory) -> Path:
    if importlib.util.find_spec("tensorrt") is None:
        pytest.skip("tensorrt is not importable (TensorRT is not installed on this machine)")
    from mfnet.export.tensorrt import build_engines

    directory = tmp_path_factory.mktemp("trt") / "engines"
    shutil.copytree(exported, directory)
    build_engines(directory, "fp32", opt_batch=2)
    return directory


@needs_tensorrt
def test_tensorrt_every_role_at_the_profile_ends_against_onnxruntime(trt_engines) -> None:
    manifest = read_manifest(trt_engines)
    reference = open_backend(manifest, "onnxruntime", "cpu", "fp32")
    ours = open_backend(manifest, "tensorrt", "cuda", "fp32", cuda_graph_batch=1)
    assert ours.name == "tensorrt"
    rng = np.random.default_rng(1)
    # TensorRT may run FP32 layers in TF32: tolerances for that, far below a wrong result
    for count in (1, 5, ours.max_support):  # support encoder: S = 1, opt, max
        images = rng.integers(0, 256, (count, 48, 48, 3), dtype=np.uint8)
        masks = (rng.random((count, 48, 48)) < 0.4).astype(np.uint8)
        np.testing.assert_allclose(
            ours.run_support_encoder(images, masks),
            reference.run_support_encoder(images, masks),
            rtol=1e-2,
            atol=1e-2,
        )
    minimum = ours._engines["prototype_aggregator"].min_shapes["shot_features"][1]
    assert minimum == 2  # the 2-shot model's aggregator (A_S) needs two shots
    for shots in (minimum, 5, ours.max_shots):  # K = the profile minimum, opt, max
        features = rng.standard_normal((2, shots, 16)).astype(np.float32)
        np.testing.assert_allclose(
            ours.run_aggregator(features), reference.run_aggregator(features), rtol=1e-2, atol=1e-2
        )
    single = rng.standard_normal((2, 1, 16)).astype(np.float32)
    np.testing.assert_allclose(
        ours.run_aggregator(single, single=True),
        reference.run_aggregator(single, single=True),
        rtol=1e-2,
        atol=1e-2,
    )
    # decoder: batch 1 (the captured graph), opt 2, max, and batch 1 again after the others
    compare_decoders(ours, reference, [1, 2, ours.max_batch, 1], atol=2e-2)
    assert ours._engines["query_decoder"].graph_exec is not None
    ours.close()


# ----------------------------------------------------------------------- device memory, close
def free_device_bytes() -> int:
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0]  # cudaMemGetInfo: the whole device, every allocator


def cycle(open_one) -> tuple[int, int]:
    """(bytes the open backend held, bytes still missing after close)."""
    rng = np.random.default_rng(2)
    before = free_device_bytes()
    backend = open_one()
    prototypes = rng.standard_normal((2, 16)).astype(np.float32)
    for batch in (1, 2, 1):
        backend.run_decoder(random_frames(rng, batch), prototypes, True)
    held = before - free_device_bytes()
    backend.close()
    del backend
    gc.collect()
    return held, before - free_device_bytes()


@pytest.mark.parametrize(
    "which",
    [
        pytest.param("onnxruntime", marks=needs_ort_cuda),
        pytest.param("tensorrt", marks=needs_tensorrt),
    ],
)
def test_close_releases_device_memory(which, exported, request) -> None:
    directory = exported if which == "onnxruntime" else request.getfixturevalue("trt_engines")
    manifest = read_manifest(directory)

    def open_one():
        return open_backend(manifest, which, "cuda", "fp32", cuda_graph_batch=1)

    torch.zeros(1, device="cuda")  # the CUDA context exists before the first reading
    cycle(open_one)  # the first cycle loads the libraries' kernels, which stay loaded
    held, kept = cycle(open_one)
    assert held >= 1 << 20, held  # the open backend held device memory (the check can fail)
    assert kept <= 8 << 20, f"{kept / 2**20:.1f} MiB not given back by close()"


# ---------------------------------------------------------------------------------- training
def test_fp16_autocast_training_with_a_grad_scaler(tiny_config) -> None:
    from mfnet.checkpoint import load_checkpoint
    from mfnet.training.loop import train

    config = tiny_config.replace(device="cuda", amp="fp16", epochs=2)
    torch.manual_seed(config.train.seed)
    model, path = train(config, progress=False)
    payload = load_checkpoint(path)
    scale = payload["scaler"]["scale"]
    assert np.isfinite(float(scale)) and float(scale) > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    from mfnet.model.build import build_mfnet

    torch.manual_seed(config.train.seed)
    initial = build_mfnet(config.model)
    moved = [
        not torch.equal(a.cpu(), b)
        for a, b in zip(model.state_dict().values(), initial.state_dict().values(), strict=True)
        if a.dtype.is_floating_point
    ]
    assert any(moved)  # the scaled steps updated the weights (not every step was skipped)


def test_resume_restores_the_cuda_rng_streams_exactly(tiny_config, monkeypatch) -> None:
    from mfnet.checkpoint import save_checkpoint
    from mfnet.training import loop

    config = tiny_config.replace(device="cuda", epochs=2, dropout=0.3)
    states: list[torch.Tensor] = []
    real_losses = loop.compute_losses

    def recording(*args, **kwargs):  # the CUDA generator's state as each step starts
        states.append(torch.cuda.get_rng_state())
        return real_losses(*args, **kwargs)

    snapshots = []

    def save_and_keep(path, payload):
        save_checkpoint(path, payload)
        if payload["epoch"] == 1:
            snapshot = Path(path).with_name("epoch1.pt")
            shutil.copy(path, snapshot)
            snapshots.append(snapshot)

    monkeypatch.setattr(loop, "compute_losses", recording)
    monkeypatch.setattr(loop, "save_checkpoint", save_and_keep)
    straight, _ = loop.train(config, progress=False)
    straight_states = list(states)
    half = len(straight_states) // 2
    assert not torch.equal(straight_states[0], straight_states[half])  # dropout drew on CUDA
    states.clear()
    torch.cuda.manual_seed_all(12345)  # a resume must not depend on the process's CUDA state
    resumed, _ = loop.train(
        config.replace(out=config.train.out + "-resumed"), resume=snapshots[0], progress=False
    )
    assert len(states) == len(straight_states) - half
    for a, b in zip(states, straight_states[half:], strict=True):
        assert torch.equal(a, b)  # the epoch-2 steps draw exactly the uninterrupted run's numbers
    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)  # atomics: not bitwise


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_with_nccl_at_world_size_one(tiny_config) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader

    from mfnet.data.datasets import build_episodes
    from mfnet.model.build import build_mfnet
    from mfnet.training.loop import _LossForward
    from mfnet.training.objective import compute_losses

    if not dist.is_nccl_available():
        pytest.skip("this torch build has no NCCL")
    config = tiny_config.replace(dropout=0.0)
    dist.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    try:
        torch.manual_seed(0)
        plain = build_mfnet(config.model).cuda().train()
        torch.manual_seed(0)
        inner = build_mfnet(config.model).cuda().train()
        # the training loop's own DDP module: compute_losses as the forward DDP synchronises
        wrapped = DistributedDataParallel(
            _LossForward(inner, config), device_ids=[torch.cuda.current_device()]
        )
        batch = next(iter(DataLoader(build_episodes(config, "train", 1, 4, seed=0), batch_size=4)))
        batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
        compute_losses(plain, batch, config, use_metric_loss=False).total.backward()
        wrapped(batch, False, None).total.backward()  # all-reduced over NCCL (world size 1)
        compared = 0
        for (name, a), b in zip(plain.named_parameters(), inner.parameters(), strict=True):
            if a.grad is not None:
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)
                compared += 1
        assert compared > 10  # the learnable parameters all got gradients to compare
        gathered = [None]
        dist.all_gather_object(gathered, {"rank": 0, "state": torch.cuda.get_rng_state()})
        assert torch.equal(gathered[0]["state"], torch.cuda.get_rng_state())
        total = torch.ones(3, device="cuda")
        dist.all_reduce(total)
        assert total.tolist() == [1.0, 1.0, 1.0]
    finally:
        dist.destroy_process_group()


def test_segmenter_on_cuda_matches_cpu_end_to_end(exported) -> None:
    """The public API on the best GPU backend here (ONNX Runtime CUDA or TensorRT)."""
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("needs onnxruntime-gpu (ONNX Runtime's CUDA provider)")
    gpu = Segmenter.load(exported, device="cuda", precision="fp32", cuda_graph_batch=1)
    cpu = Segmenter.load(exported, device="cpu")
    rng = np.random.default_rng(3)
    mask = np.zeros((48, 48), np.uint8)
    mask[8:40, 10:34] = 1
    classes = {"a": [(random_frames(rng, 1)[0], mask)] * 2, "b": [(random_frames(rng, 1)[0], mask)]}
    support = cpu.encode_support(classes)
    frames = list(random_frames(rng, 3))
    ours = gpu.segment_batch(frames, support)
    theirs = cpu.segment_batch(frames, support)
    assert len(np.unique(theirs[0])) >= 2
    for a, b in zip(ours, theirs, strict=True):
        assert (a == b).mean() >= 0.999
    gpu.close()
