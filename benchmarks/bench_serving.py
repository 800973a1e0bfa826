"""Load and fault test of serving: many streams on one MFNet server vs the in-process runtime.

    python benchmarks/bench_serving.py --checkpoint runs/synthetic-cpu/last.pt [--streams 1 4 16]
    python benchmarks/bench_serving.py --engines DIR

The engines (an export of ``--checkpoint`` into a temporary folder, or ``--engines``) are
served by ``python -m mfnet_runtime serve`` in a subprocess. Each stream is a thread with its
own ``RemoteSegmenter`` and its own support set (synthetic fold-0 test episodes, one seed per
stream); it sends its frames one request at a time for ``--seconds``. Per stream count:
throughput (frames/s of all streams together), p50 / p99 request latency, and the batches the
server formed (from its Prometheus metrics: requests and frames per execution of
mfnet_segment). The in-process runtime (``Segmenter``, one frame per call, the same threads)
is timed on the same frames in the same run; ``ratio`` = served / in-process throughput. Every
response's labels are compared with the in-process labels of its stream and frame; a failed or
different response is counted.

Then the faults, with 4 streams running: bad requests (wrong dtype, shape, N, NaN prototypes,
garbage bytes, an oversize batch) must each get a clear error while the streams see no
failure; the server is killed (SIGKILL of its process group) and every stream must get a
``ServerError`` within the client timeout, never hang; a server restarted on the same ports
must serve the same clients again; SIGTERM must end it with exit code 0. The JSON goes to
benchmarks/results/ (atomically); exit code 1 when a check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model, now_utc, percentile, versions  # noqa: E402
from _server_process import ServerProcess, free_ports  # noqa: E402
from mfnet.data.episodes import synthetic_episodes  # noqa: E402
from mfnet_runtime import Segmenter  # noqa: E402
from mfnet_runtime.atomic import atomic_write_bytes  # noqa: E402
from mfnet_runtime.errors import ServerError  # noqa: E402
from mfnet_runtime.serving import RemoteSegmenter, protocol  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ inputs
def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float [..., 3, H, W] in [0, 1] -> uint8 [..., H, W, 3]."""
    return (images * 255).round().to(torch.uint8).movedim(-3, -1).numpy()


def stream_inputs(seed: int, way: int, size: int, frames: int) -> tuple[dict, list[np.ndarray]]:
    """A support set {class: [(image, mask)]} and ``frames`` query frames of one stream."""
    episodes = synthetic_episodes(
        fold=0, split="test", way=way, shot=1, num_episodes=frames, seed=seed, image_size=size
    )
    images = to_uint8(episodes[0]["support_images"])  # [N, K, H, W, 3]
    masks = episodes[0]["support_masks"].numpy().astype(np.uint8)  # [N, K, H, W]
    support = {f"class{n + 1}": [(images[n, 0], masks[n, 0])] for n in range(way)}
    return support, [to_uint8(episodes[i]["query_image"]) for i in range(frames)]


# ------------------------------------------------------------------------------ server
def start_server(engines: Path, ports: list[int], extra: list[str], log: Path) -> ServerProcess:
    """``python -m mfnet_runtime serve`` on ``ports``, ready (startup seconds in .startup_s)."""
    server = ServerProcess([sys.executable, "-m", "mfnet_runtime"], engines, ports, extra, log=log)
    try:
        return server.wait_ready(180.0)
    except RuntimeError as error:
        raise SystemExit(str(error)) from None


def segment_metrics(server: ServerProcess) -> dict[str, float]:
    """The mfnet_segment counters of ``server``: requests, failed requests, frames, executions."""
    counters = server.model_counters(protocol.SEGMENT_MODEL)
    names = {
        "nv_inference_request_success": "requests",
        "nv_inference_request_failure": "failed_requests",
        "nv_inference_count": "frames",
        "nv_inference_exec_count": "executions",
    }
    return {short: counters[name] for name, short in names.items() if name in counters}


# -------------------------------------------------------------------------------- runs
def stats_ms(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": round(statistics.median(ordered), 3),
        "p99_ms": round(percentile(ordered, 0.99), 3),
        "mean_ms": round(statistics.fmean(ordered), 3),
        "n": len(ordered),
    }


def in_process(segmenter: Segmenter, streams: list, supports: list, seconds: float) -> dict:
    """One frame per call, streams taken in turn, for ``seconds``."""
    latencies, count, started = [], 0, time.perf_counter()
    while time.perf_counter() - started < seconds or count < 10:
        classes_frames = streams[count % len(streams)][1]
        frame = classes_frames[(count // len(streams)) % len(classes_frames)]
        begin = time.perf_counter()
        segmenter.segment(frame, supports[count % len(streams)])
        latencies.append((time.perf_counter() - begin) * 1e3)
        count += 1
    elapsed = time.perf_counter() - started
    return {
        "frames": count,
        "seconds": round(elapsed, 3),
        "fps": round(count / elapsed, 2),
        **stats_ms(latencies),
    }


class Stream(threading.Thread):
    """One client stream: its own RemoteSegmenter and support set, one frame per request."""

    def __init__(
        self, url: str, protocol_name: str, inputs: tuple, expected: list, timeout: float
    ) -> None:
        super().__init__(daemon=True)
        self.client = RemoteSegmenter(url, protocol=protocol_name, timeout=timeout)
        self.support = self.client.encode_support(inputs[0])
        self.frames, self.expected = inputs[1], expected
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.mismatches = 0
        self.stop = threading.Event()
        self.go = threading.Event()
        self.error_after_s: float | None = None  # set by the kill phase
        self.until_error = False

    def run(self) -> None:
        self.go.wait()
        index = 0
        while not self.stop.is_set():
            frame = index % len(self.frames)
            begin = time.perf_counter()
            try:
                labels = self.client.segment(self.frames[frame], self.support)
            except ServerError as error:
                if self.until_error:
                    self.error_after_s = time.perf_counter() - begin
                    self.error = error
                    return
                self.failures.append(str(error)[:300])
                index += 1
                continue
            self.latencies.append((time.perf_counter() - begin) * 1e3)
            if not np.array_equal(labels, self.expected[frame]):
                self.mismatches += 1
            index += 1


def run_streams(
    url: str,
    protocol_name: str,
    inputs: list,
    expected: list,
    count: int,
    seconds: float,
    timeout: float,
    server: ServerProcess,
) -> dict:
    streams = [Stream(url, protocol_name, inputs[i], expected[i], timeout) for i in range(count)]
    for stream in streams:
        stream.start()
    before = segment_metrics(server)
    started = time.perf_counter()
    for stream in streams:
        stream.go.set()
    time.sleep(seconds)
    for stream in streams:
        stream.stop.set()
    for stream in streams:
        stream.join(timeout=timeout + 10)
    elapsed = time.perf_counter() - started
    after = segment_metrics(server)
    delta = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in after}
    latencies = [x for s in streams for x in s.latencies]
    frames = len(latencies)
    for stream in streams:
        stream.client.close()
    executions = delta.get("executions", 0.0) or 1.0
    return {
        "streams": count,
        "frames": frames,
        "seconds": round(elapsed, 3),
        "fps": round(frames / elapsed, 2),
        **stats_ms(latencies),
        "failed_requests": sum(len(s.failures) for s in streams),
        "failure_samples": [f for s in streams for f in s.failures][:3],
        "label_mismatches": sum(s.mismatches for s in streams),
        "server": {
            **{k: int(v) for k, v in delta.items()},
            "requests_per_execution": round(delta.get("requests", 0.0) / executions, 2),
            "frames_per_execution": round(delta.get("frames", 0.0) / executions, 2),
        },
    }


def bad_requests(url: str, size: int, way: int, channels: int, max_batch: int) -> list[dict]:
    """Each bad request once; the error text the server answered."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    frame = np.zeros((1, size, size, 3), np.uint8)
    good = np.ones((1, way, channels), np.float32)
    nan = good.copy()
    nan[0, 0, 0] = np.nan
    cases = {
        "wrong dtype": (frame.astype(np.float32), good),
        "wrong shape": (frame[:, : size // 2], good),
        "wrong N": (frame, np.ones((1, way + 1, channels), np.float32)),
        "NaN prototypes": (frame, nan),
        "oversize batch": (np.repeat(frame, max_batch + 1, 0), np.repeat(good, max_batch + 1, 0)),
    }
    answers = []
    client = httpclient.InferenceServerClient(url, network_timeout=30)
    for name, (frames, prototypes) in cases.items():
        inputs = []
        for tensor_name, array in ((protocol.FRAMES, frames), (protocol.PROTOTYPES, prototypes)):
            tensor = httpclient.InferInput(
                tensor_name, list(array.shape), "UINT8" if array.dtype == np.uint8 else "FP32"
            )
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        try:
            client.infer(protocol.SEGMENT_MODEL, inputs)
            answers.append({"case": name, "refused": False})
        except InferenceServerException as error:
            text = " ".join(str(error).split())
            reason = protocol.refusal_reason(str(error))
            answers.append({"case": name, "refused": True, "error": (reason or text)[:240]})
    client.close()
    request = urllib.request.Request(
        f"http://{url}/v2/models/{protocol.SEGMENT_MODEL}/infer",
        data=b"\x00\xffgarbage" * 16,
        headers={"Content-Type": "application/octet-stream"},
    )
    try:
        urllib.request.urlopen(request, timeout=30)
        answers.append({"case": "garbage bytes", "refused": False})
    except urllib.error.HTTPError as error:
        answers.append(
            {
                "case": "garbage bytes",
                "refused": True,
                "error": f"HTTP {error.code}: {error.read().decode()[:200]}",
            }
        )
    return answers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a training checkpoint, exported here to ONNX")
    source.add_argument("--engines", help="an export directory")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seconds", type=float, default=8.0, help="per stream count")
    parser.add_argument("--frames", type=int, default=6, help="distinct frames per stream")
    parser.add_argument("--protocol", choices=["http", "grpc"], default="http")
    parser.add_argument("--timeout", type=float, default=10.0, help="client timeout, s")
    parser.add_argument("--threads", type=int, default=1, help="server and in-process threads")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--queue-delay-us", type=int, default=2000)
    parser.add_argument("--name", default="serving_cpu", help="the JSON's name (without .json)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the JSON result")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="mfnet-bench-serving-") as scratch:
        engines = Path(args.engines) if args.engines else Path(scratch) / "engines"
        if args.checkpoint:
            from mfnet.export.onnx_export import export_onnx

            export_onnx(args.checkpoint, engines, precisions=("fp32",))
        local = Segmenter.load(engines, backend="onnxruntime", device="cpu", threads=args.threads)
        way, size = local.way, local.input_size
        count = max(args.streams + [4])
        inputs = [stream_inputs(100 + i, way, size, args.frames) for i in range(count)]
        supports = [local.encode_support(classes) for classes, _ in inputs]
        expected = [
            [local.segment(f, s) for f in frames]
            for (_, frames), s in zip(inputs, supports, strict=True)
        ]
        varied = sum(len(np.unique(labels)) > 1 for stream in expected for labels in stream)
        if varied < len(expected) * args.frames // 2:
            raise SystemExit(f"only {varied} of the reference label maps hold > 1 label")
        print(f"in-process: {args.seconds:g} s ...", flush=True)
        reference = in_process(local, inputs, supports, args.seconds)
        print(f"in-process: {reference['fps']} frames/s, p99 {reference['p99_ms']} ms", flush=True)

        ports = free_ports(3)
        log = Path(scratch) / "server.log"  # Triton's log: its tail is printed on a failure
        serve_args = [
            "--threads",
            str(args.threads),
            "--max-batch",
            str(args.max_batch),
            "--queue-delay-us",
            str(args.queue_delay_us),
        ]
        server = start_server(engines, ports, serve_args, log)
        startup_s = server.startup_s
        url = server.url if args.protocol == "http" else f"127.0.0.1:{ports[1]}"
        rows = []
        for streams in args.streams:
            row = run_streams(
                url, args.protocol, inputs, expected, streams, args.seconds, args.timeout, server
            )
            row["ratio_to_in_process"] = round(row["fps"] / reference["fps"], 3)
            rows.append(row)
            print(
                f"{streams:>2} streams: {row['fps']} frames/s, p50 {row['p50_ms']} ms, p99 "
                f"{row['p99_ms']} ms, ratio {row['ratio_to_in_process']}, requests/exec "
                f"{row['server']['requests_per_execution']}, failed {row['failed_requests']}, "
                f"mismatches {row['label_mismatches']}",
                flush=True,
            )

        # faults: bad requests while 4 streams run
        streams = [
            Stream(url, args.protocol, inputs[i], expected[i], args.timeout) for i in range(4)
        ]
        for stream in streams:
            stream.start()
            stream.go.set()
        time.sleep(0.5)
        refused = bad_requests(server.url, size, way, local.channels, args.max_batch)
        time.sleep(0.5)
        for stream in streams:
            stream.stop.set()
            stream.join(timeout=args.timeout + 10)
        during_bad = {
            "bad_requests": refused,
            "all_refused": all(a["refused"] for a in refused),
            "good_frames": sum(len(s.latencies) for s in streams),
            "good_failed": sum(len(s.failures) for s in streams),
            "good_mismatches": sum(s.mismatches for s in streams),
        }
        # kill the server mid-run: every stream must get a ServerError within the timeout
        for stream in streams:
            stream.stop.clear()
        killers = [
            Stream(url, args.protocol, inputs[i], expected[i], args.timeout) for i in range(4)
        ]
        for stream in killers:
            stream.until_error = True
            stream.start()
            stream.go.set()
        time.sleep(1.0)
        killed_at = time.perf_counter()
        server.kill()
        for stream in killers:
            stream.join(timeout=args.timeout + 20)
        kill = {
            "streams": len(killers),
            "all_got_server_error": all(s.error_after_s is not None for s in killers),
            "hung": sum(s.is_alive() for s in killers),
            "seconds_to_error_max": round(time.perf_counter() - killed_at, 3),
            "error_kinds": sorted({s.error.kind for s in killers if s.error_after_s is not None}),
            "error_sample": str(getattr(killers[0], "error", ""))[:240],
            "client_timeout_s": args.timeout,
        }
        # restart on the same ports: the same clients serve again
        server = start_server(engines, ports, serve_args, log)
        restart_s = server.startup_s
        served_again, mismatches = 0, 0
        for stream in killers:
            for frame, want in zip(stream.frames, stream.expected, strict=True):
                labels = stream.client.segment(frame, stream.support)
                served_again += 1
                mismatches += int(not np.array_equal(labels, want))
            stream.client.close()
        restart = {
            "startup_s": round(restart_s, 2),
            "frames_served_by_old_clients": served_again,
            "label_mismatches": mismatches,
        }
        sigterm_code = server.terminate()
        local.close()

    payload: dict[str, Any] = {
        "benchmark": "bench_serving",
        "created": now_utc(),
        "command": "python benchmarks/bench_serving.py " + " ".join(argv or sys.argv[1:]),
        "device": {
            "cpu": cpu_model(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
        },
        "versions": {**versions(), **_serving_versions()},
        "model": {
            "way": way,
            "input_size": size,
            "channels": local.channels,
            "backend": local.backend_name,
        },
        "settings": {
            k: getattr(args, k)
            for k in (
                "protocol",
                "seconds",
                "frames",
                "timeout",
                "threads",
                "max_batch",
                "queue_delay_us",
            )
        },
        "server_startup_s": round(startup_s, 2),
        "in_process": reference,
        "rows": rows,
        "bad_requests": during_bad,
        "kill": kill,
        "restart": restart,
        "sigterm_exit_code": sigterm_code,
    }
    path = args.out / f"{args.name}.json"
    atomic_write_bytes(path, (json.dumps(payload, indent=2) + "\n").encode())
    print(f"wrote {path}")
    ok = (
        all(r["failed_requests"] == 0 and r["label_mismatches"] == 0 for r in rows)
        and during_bad["all_refused"]
        and during_bad["good_failed"] == 0
        and during_bad["good_mismatches"] == 0
        and kill["all_got_server_error"]
        and kill["hung"] == 0
        and mismatches == 0
        and sigterm_code == 0
    )
    print("all checks passed" if ok else "SOME CHECKS FAILED (see the JSON)")
    return 0 if ok else 1


def _serving_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("nvidia-pytriton", "tritonclient"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


if __name__ == "__main__":
    sys.exit(main())
