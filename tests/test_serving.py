"""Serving: ``python -m mfnet_runtime serve`` (Triton through PyTriton) and ``RemoteSegmenter``.

A tiny exported model whose labels vary (the session export of ``runtime_fixtures``) is
served on the CPU from a subprocess with torch blocked, on free ports. The checks: the labels
from the server equal the in-process runtime's on the same frames, over HTTP and gRPC, with
several streams (each with its own support set) batched together; bad requests get a clear
error while another stream keeps being served; the segment CLI works through ``--server``; a
dead server gives a ``ServerError`` within the timeout (never a hang) and one ``error:`` line
from the CLI; a restarted server serves the same client again; SIGTERM lets the requests in
flight finish. Skipped only when PyTriton or tritonclient is not installed (CI installs the
``serve`` extra).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("pytriton", reason="PyTriton is not installed: pip install './runtime[serve]'")
httpclient = pytest.importorskip(
    "tritonclient.http", reason="tritonclient is not installed: pip install './runtime[serve]'"
)

from tritonclient.utils import InferenceServerException  # noqa: E402

from mfnet.data.episodes import synthetic_episodes  # noqa: E402
from mfnet_runtime import Segmenter, cli  # noqa: E402
from mfnet_runtime.errors import RuntimeInputError, ServerError  # noqa: E402
from mfnet_runtime.serving import RemoteSegmenter, protocol  # noqa: E402
from mfnet_runtime.support import SupportSet  # noqa: E402
from tests.runtime_fixtures import assert_labels_vary  # noqa: E402
from tests.scripts import load_script  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _server_process import ServerProcess, free_ports  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZE, WAY, MAX_BATCH = 48, 2, 4
READY_TIMEOUT = 90.0  # seconds a server may take to start (Triton + 3 models)
# The server's process, with torch (and the training package) blocked: serving is torch-free.
SERVE_SCRIPT = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "mfnet"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
from mfnet_runtime.cli import main
sys.exit(main(sys.argv[1:]))
"""


def serve_process(engines: Path, ports: list[int], *extra: str) -> ServerProcess:
    """The serve command (torch blocked, one thread) on ``ports``; call ``wait_ready``."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "runtime"), os.environ.get("PYTHONPATH", "")]),
    }
    launcher = [sys.executable, "-c", SERVE_SCRIPT]
    return ServerProcess(launcher, engines, ports, [*extra, "--threads", "1"], env=env)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float [..., 3, H, W] in [0, 1] -> uint8 [..., H, W, 3]."""
    return (images * 255).round().to(torch.uint8).movedim(-3, -1).numpy()


def stream_inputs(seed: int, frames: int = 3) -> tuple[dict, list[np.ndarray]]:
    """One stream: a support set {class: [(image, mask)]} and ``frames`` query frames, from
    synthetic fold-0 test episodes (seed 7 is the one ``varied_model`` checks)."""
    episodes = synthetic_episodes(
        fold=0, split="test", way=WAY, shot=1, num_episodes=frames, seed=seed, image_size=SIZE
    )
    images = to_uint8(episodes[0]["support_images"])  # [N, K, H, W, 3]
    masks = episodes[0]["support_masks"].numpy().astype(np.uint8)  # [N, K, H, W]
    support = {f"c{n}": [(images[n, 0], masks[n, 0])] for n in range(WAY)}
    queries = [to_uint8(episodes[i]["query_image"]) for i in range(frames)]
    return support, queries


@pytest.fixture(scope="module")
def engines(varied_export) -> Path:
    return varied_export(WAY, 1, SIZE)[0]


@pytest.fixture(scope="module")
def local(engines) -> Segmenter:
    return Segmenter.load(engines, backend="onnxruntime", device="cpu", threads=1)


@pytest.fixture(scope="module")
def server(engines):
    """A server shared by the module's tests (max batch 4, 20 ms queue delay so that
    concurrent streams share batches)."""
    running = serve_process(
        engines, free_ports(3), "--max-batch", str(MAX_BATCH), "--queue-delay-us", "20000"
    ).wait_ready(READY_TIMEOUT)
    yield running
    running.kill()


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("kind", ["http", "grpc"])
def test_server_labels_equal_the_in_process_runtime(server, local, kind) -> None:
    url = server.url if kind == "http" else server.grpc_url
    remote = RemoteSegmenter(url, protocol=kind, timeout=20)
    assert (remote.way, remote.input_size, remote.engine_id) == (
        local.way,
        local.input_size,
        local.engine_id,
    )
    classes, frames = stream_inputs(7, frames=3)
    frames.append(np.ascontiguousarray(frames[0][:40, :30]))  # a non-square frame: pad + restore
    support_local = local.encode_support(classes)
    support_remote = remote.encode_support(classes)
    assert support_remote.class_names == support_local.class_names
    np.testing.assert_allclose(support_remote.prototypes, support_local.prototypes, atol=1e-6)
    expected = local.segment_batch(frames, support_local)
    assert_labels_vary(expected[:3], frames[:3], min_labels=WAY + 1)
    got = remote.segment_batch(frames, support_remote)
    for want, have in zip(expected, got, strict=True):
        np.testing.assert_array_equal(have, want)
    np.testing.assert_array_equal(remote.segment(frames[1], support_remote), expected[1])
    np.testing.assert_allclose(
        remote.probabilities(frames[2], support_remote),
        local.probabilities(frames[2], support_local),
        atol=1e-5,
    )
    # more frames than the server's max batch: split into requests
    many = remote.segment_batch(frames * 2, support_remote)
    for want, have in zip(expected * 2, many, strict=True):
        np.testing.assert_array_equal(have, want)
    remote.close()


def test_streams_with_their_own_support_sets_share_batches(server, local) -> None:
    """Four streams at once, each with its own support set: every label map equals the
    in-process one of its stream, and the server ran fewer executions than requests."""
    streams = [stream_inputs(seed, frames=3) for seed in (7, 11, 13, 17)]
    expected = [
        local.segment_batch(frames, local.encode_support(classes)) for classes, frames in streams
    ]
    for labels, (_, frames) in zip(expected, streams, strict=True):
        assert_labels_vary(labels, frames)
    # two streams decoding the same frames with different support sets differ somewhere
    assert any(not np.array_equal(a, b) for a, b in zip(expected[0], expected[1], strict=True))
    before = server.model_counters(protocol.SEGMENT_MODEL)
    failures: list[BaseException] = []
    results: dict[int, list[list[np.ndarray]]] = {}

    def run(index: int) -> None:
        try:
            remote = RemoteSegmenter(server.url, timeout=20)
            support = remote.encode_support(streams[index][0])
            results[index] = [
                [remote.segment(frame, support) for frame in streams[index][1]] for _ in range(4)
            ]
            remote.close()
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            failures.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(streams))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not failures, failures
    for index, rounds in results.items():
        for labels in rounds:
            for want, have in zip(expected[index], labels, strict=True):
                np.testing.assert_array_equal(have, want)
    after = server.model_counters(protocol.SEGMENT_MODEL)
    requests = after["nv_inference_request_success"] - before["nv_inference_request_success"]
    executions = after["nv_inference_exec_count"] - before["nv_inference_exec_count"]
    assert requests == 4 * 4 * 3 and executions < requests, (requests, executions)


# ------------------------------------------------------------------------- bad requests
def raw_segment(url: str, frames: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
    client = httpclient.InferenceServerClient(url, network_timeout=20)
    try:
        inputs = []
        for name, array in ((protocol.FRAMES, frames), (protocol.PROTOTYPES, prototypes)):
            dtype = {np.dtype(np.uint8): "UINT8", np.dtype(np.float32): "FP32"}.get(
                array.dtype, "FP64"
            )
            tensor = httpclient.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        result = client.infer(protocol.SEGMENT_MODEL, inputs)
        return result.as_numpy(protocol.LABELS)
    finally:
        client.close()


def test_bad_requests_get_clear_errors_and_other_streams_keep_going(server, local) -> None:
    classes, frames = stream_inputs(7, frames=3)
    support = local.encode_support(classes)
    expected = local.segment_batch(frames, support)
    prepared, _ = local.prepare_frames(frames)
    one = prepared[:1]
    good = np.broadcast_to(support.prototypes, (1, WAY, support.prototypes.shape[1])).copy()
    stop, failures, served = threading.Event(), [], [0]

    def good_stream() -> None:
        remote = RemoteSegmenter(server.url, timeout=20)
        own = remote.encode_support(classes)
        try:
            while not stop.is_set():
                for frame, want in zip(frames, expected, strict=True):
                    np.testing.assert_array_equal(remote.segment(frame, own), want)
                    served[0] += 1
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            failures.append(error)

    thread = threading.Thread(target=good_stream)
    thread.start()
    try:
        nan = good.copy()
        nan[0, 1, 3] = np.nan
        cases = [
            ("dtype", one.astype(np.float32), good, "FP32"),
            ("shape", one[:, :40], good, "shape"),
            ("way", one, np.concatenate([good, good[:, :1]], axis=1), "shape"),
            ("nan", one, nan, "NaN or infinite"),
            ("batch", np.repeat(one, MAX_BATCH + 1, 0), np.repeat(good, MAX_BATCH + 1, 0), "batch"),
        ]
        for _ in range(3):  # several rounds, so that refusals meet the good stream's requests
            for name, frames_in, prototypes_in, expected_text in cases:
                with pytest.raises(InferenceServerException) as caught:
                    raw_segment(server.url, frames_in, prototypes_in)
                assert expected_text in str(caught.value), (name, str(caught.value)[-400:])
        # garbage bytes: a body that is no inference request at all (Triton answers 500 to
        # JSON it cannot parse), and binary data shorter than the header announces (400)
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": protocol.FRAMES,
                        "shape": [1, SIZE, SIZE, 3],
                        "datatype": "UINT8",
                        "parameters": {"binary_data_size": SIZE * SIZE * 3},
                    }
                ]
            }
        ).encode()
        for body, headers, code, text in (
            (b"\x00\xffnot a request" * 10, {}, 500, "failed to parse the request"),
            (
                header + b"\x00" * 100,
                {"Inference-Header-Content-Length": str(len(header))},
                400,
                "unexpected size for input",
            ),
        ):
            request = urllib.request.Request(
                f"http://{server.url}/v2/models/{protocol.SEGMENT_MODEL}/infer",
                data=body,
                headers={"Content-Type": "application/octet-stream", **headers},
            )
            with pytest.raises(urllib.error.HTTPError) as http_error:
                urllib.request.urlopen(request, timeout=10)
            assert http_error.value.code == code, http_error.value.code
            assert text in http_error.value.read().decode()
        # an empty mask sent to the encoder by hand
        client = httpclient.InferenceServerClient(server.url, network_timeout=20)
        inputs = []
        for name, array, dtype in (
            (protocol.IMAGES, np.zeros((2, SIZE, SIZE, 3), np.uint8), "UINT8"),
            (protocol.MASKS, np.zeros((2, SIZE, SIZE), np.uint8), "UINT8"),
            (protocol.SHOT_COUNTS, np.ones(WAY, np.int32), "INT32"),
        ):
            tensor = httpclient.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        with pytest.raises(InferenceServerException) as caught:
            client.infer(protocol.ENCODE_MODEL, inputs)
        assert protocol.REFUSAL in str(caught.value) and "empty" in str(caught.value)
        client.close()
        # the client refuses broken prototypes before sending them
        remote = RemoteSegmenter(server.url, timeout=20)
        broken = SupportSet(support.class_names, support.shot_features, nan[0], support.engine_id)
        with pytest.raises(RuntimeInputError, match="NaN or infinite"):
            remote.segment(frames[0], broken)
        remote.close()
        time.sleep(0.3)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not failures, failures
    assert served[0] >= 3
    np.testing.assert_array_equal(raw_segment(server.url, one, good)[0], expected[0][:SIZE, :SIZE])


# ---------------------------------------------------------------------------------- CLI
def write_spec(root: Path, classes: dict) -> Path:
    for name, [(image, mask)] in classes.items():
        (root / name).mkdir(parents=True)
        Image.fromarray(image).save(root / name / "shot.png")
        Image.fromarray(mask * 255).save(root / name / "shot.mask.png")
    (root / "classes.txt").write_text("".join(f"{name}\n" for name in classes))
    return root


def test_segment_cli_through_the_server(server, engines, tmp_path, capsys) -> None:
    classes, frames = stream_inputs(7, frames=3)
    spec = write_spec(tmp_path / "spec", classes)
    (tmp_path / "in").mkdir()
    for index, frame in enumerate(frames):
        Image.fromarray(frame).save(tmp_path / "in" / f"{index}.png")
    common = ["--support", str(spec), "--input", str(tmp_path / "in"), "--no-progress"]
    assert (
        cli.main(["segment", "--engines", str(engines), *common, "--output", str(tmp_path / "a")])
        == 0
    )
    assert (
        cli.main(
            ["segment", "--server", server.grpc_url, "--protocol", "grpc", *common]
            + ["--output", str(tmp_path / "b"), "--timeout", "20"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "frames: 3 " in out and "frames per second" in out and "backend: server" in out
    for index in range(3):
        a = np.asarray(Image.open(tmp_path / "a" / f"{index}.png"))
        b = np.asarray(Image.open(tmp_path / "b" / f"{index}.png"))
        np.testing.assert_array_equal(b, a)
        assert (tmp_path / "b" / f"{index}_overlay.png").is_file()
    # nothing listens on this port: one error line, exit 2, fast
    closed = free_ports(1)[0]
    started = time.monotonic()
    code = cli.main(["segment", "--server", f"127.0.0.1:{closed}", *common, "--timeout", "5"])
    assert code == 2 and time.monotonic() - started < 10
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: inference server"), lines
    assert "cannot reach it" in lines[0]


# ------------------------------------------------------------------------- life cycle
def test_dead_server_fails_fast_restart_serves_again_and_sigterm_drains(engines, local) -> None:
    ports = free_ports(3)
    classes, frames = stream_inputs(7, frames=3)
    expected = local.segment_batch(frames, local.encode_support(classes))
    first = serve_process(engines, ports).wait_ready(READY_TIMEOUT)
    remote = RemoteSegmenter(first.url, timeout=5)
    support = remote.encode_support(classes)
    np.testing.assert_array_equal(remote.segment(frames[0], support), expected[0])
    first.kill()
    started = time.monotonic()
    with pytest.raises(ServerError) as caught:
        remote.segment(frames[1], support)
    assert time.monotonic() - started < 6 and caught.value.kind in ("unreachable", "timeout")
    # restarted on the same ports (1 s queue delay: requests wait in the batcher): the same
    # client serves again
    second = serve_process(
        engines, ports, "--queue-delay-us", "1000000", "--max-batch", "8", "--exit-timeout", "20"
    ).wait_ready(READY_TIMEOUT)
    try:
        np.testing.assert_array_equal(remote.segment(frames[1], support), expected[1])
        remote.close()  # Triton's shutdown waits for open keep-alive connections
        # SIGTERM while a request waits in the batcher: it finishes, then the server exits 0
        answers: list[object] = []

        def one_request() -> None:
            with RemoteSegmenter(second.url, timeout=10) as client:
                waiting_started.set()
                answers.append(_try(lambda: client.segment(frames[2], support)))

        waiting_started = threading.Event()
        waiting = threading.Thread(target=one_request)
        waiting.start()
        assert waiting_started.wait(10)
        time.sleep(0.4)  # the request now waits in the batcher (1 s queue delay)
        started = time.monotonic()
        assert second.terminate() == 0, "\n".join(second.lines[-30:])
        waiting.join(timeout=30)
        assert len(answers) == 1 and isinstance(answers[0], np.ndarray), answers
        np.testing.assert_array_equal(answers[0], expected[2])
        assert (
            any(line.startswith("stopped (") for line in second.lines)
            and time.monotonic() - started < 15
        )
    finally:
        second.kill()
        remote.close()


def _try(call):
    try:
        return call()
    except Exception as error:  # noqa: BLE001 - the test inspects it
        return error


def test_serve_refuses_bad_options(engines, capsys) -> None:
    code = cli.main(
        ["serve", "--engines", str(engines), "--http-port", "9000", "--grpc-port", "9000"]
    )
    assert code == 2
    assert "must differ" in capsys.readouterr().err
    with pytest.raises(RuntimeInputError, match="host:port"):
        RemoteSegmenter("not a url")
    with pytest.raises(RuntimeInputError, match="not an MFNet serving record"):
        protocol.ServingInfo.from_json(b'{"way": 1}', "server x")
    fields = json.loads(
        protocol.ServingInfo(1, 2, 3, "pad", "small", "e", 4, 5, 6, "b", "fp32").to_json()
    )
    with pytest.raises(RuntimeInputError, match="protocol version 99"):
        protocol.ServingInfo.from_json(json.dumps({**fields, "version": 99}).encode())


# ------------------------------------------------------------------ the models, in process
class FakeRequest(dict):
    """What PyTriton hands a model function: the inputs by name, plus request parameters."""

    def __init__(self, parameters: dict | None = None, **inputs: np.ndarray) -> None:
        super().__init__(inputs)
        self.parameters = parameters or {}


def test_per_frame_prototypes_decode_each_frame_with_its_own_set(local) -> None:
    """One batch mixing three streams' frames, decoded as the server does (one call with a
    prototype set per frame): each frame's labels equal its own stream's."""

    streams = [stream_inputs(seed, frames=2) for seed in (7, 11, 13)]
    supports = [local.encode_support(classes) for classes, _ in streams]
    frames, prototypes, expected = [], [], []
    for (_, queries), support in zip(streams, supports, strict=True):
        prepared, _ = local.prepare_frames(queries)
        frames.append(prepared)
        prototypes.append(np.repeat(support.prototypes[None], len(queries), 0))
        expected.append(local.decode_prepared(prepared, support))
    order = [0, 2, 4, 1, 3, 5]  # interleave the streams
    batch = np.concatenate(frames)[order]
    per_frame = np.concatenate(prototypes)[order]
    want = np.concatenate(expected)[order]
    assert_labels_vary(list(want), list(batch))
    labels, probabilities = local.decode_frames(batch, per_frame, True)
    np.testing.assert_array_equal(labels, want)
    assert probabilities is not None and probabilities.shape == (6, WAY + 1, SIZE, SIZE)
    np.testing.assert_array_equal(probabilities.argmax(1), want)


def test_a_refused_request_names_itself_and_its_batch_mates(local) -> None:
    from mfnet_runtime.serving.server import _InFlight, segment_function, serving_info

    infer = segment_function(local, serving_info(local), _InFlight())
    classes, queries = stream_inputs(7, frames=2)
    support = local.encode_support(classes)
    frames, _ = local.prepare_frames(queries)
    good = np.repeat(support.prototypes[None], 2, 0)
    bad = good.copy()
    bad[1, 0, 0] = np.inf
    answers = infer(
        [FakeRequest(frames=frames, prototypes=good, parameters={"probabilities": True})]
    )
    np.testing.assert_array_equal(
        answers[0][protocol.LABELS], local.decode_prepared(frames, support)
    )
    assert answers[0][protocol.PROBABILITIES].shape == (2, WAY + 1, SIZE, SIZE)
    plain = infer([FakeRequest(frames=frames, prototypes=good)])
    assert protocol.PROBABILITIES not in plain[0]
    with pytest.raises(RuntimeInputError) as caught:
        infer(
            [
                FakeRequest(frames=frames, prototypes=good),
                FakeRequest(frames=frames, prototypes=bad),
            ]
        )
    text = str(caught.value)
    assert text.startswith(protocol.REFUSAL) and "request 2 of 2" in text and "frame(s) [1]" in text
    assert protocol.NOT_RUN in text and "request 1 of 2" not in text
    assert protocol.refusal_reason("Traceback ...\n" + text + "\n") == text[len(protocol.REFUSAL) :]


# -------------------------------------------------------------------------- benchmark
def test_load_benchmark_runs_at_a_small_scale(engines, tmp_path, capsys) -> None:
    """benchmarks/bench_serving.py end to end (2 streams for 1 s, then the faults): its checks
    pass and its JSON holds the measured rows, batches seen and fault outcomes."""
    bench = load_script("benchmarks/bench_serving.py")
    argv = ["--engines", str(engines), "--streams", "2", "--seconds", "1", "--frames", "3"]
    assert bench.main([*argv, "--out", str(tmp_path), "--name", "tiny"]) == 0
    assert "all checks passed" in capsys.readouterr().out
    payload = json.loads((tmp_path / "tiny.json").read_text())
    (row,) = payload["rows"]
    assert row["streams"] == 2 and row["frames"] > 0 and row["server"]["executions"] > 0
    assert row["failed_requests"] == 0 and row["label_mismatches"] == 0
    assert payload["in_process"]["fps"] > 0 and payload["sigterm_exit_code"] == 0
    assert payload["bad_requests"]["all_refused"] and payload["kill"]["hung"] == 0
