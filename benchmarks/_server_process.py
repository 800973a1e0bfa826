"""``python -m mfnet_runtime serve`` in a child process, for the load benchmark
(bench_serving.py) and the serving tests: free ports, the readiness line, kill and SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 now."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class ServerProcess:
    """The serve command ``launcher + ["serve", "--engines", ...]`` in its own process group
    (so that a kill reaches PyTriton, tritonserver and the backend stubs); its output lines are
    collected (and appended to ``log`` when given)."""

    def __init__(
        self,
        launcher: Sequence[str],
        engines: Path,
        ports: Sequence[int],
        extra: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        log: Path | None = None,
    ) -> None:
        self.ports = list(ports)
        self.url = f"127.0.0.1:{ports[0]}"
        self.grpc_url = f"127.0.0.1:{ports[1]}"
        self.metrics_url = f"http://127.0.0.1:{ports[2]}/metrics"
        command = [*launcher, "serve", "--engines", str(engines)]
        command += ["--http-port", str(ports[0]), "--grpc-port", str(ports[1])]
        command += ["--metrics-port", str(ports[2]), *extra]
        self.log = log.open("a") if log is not None else None
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=dict(env) if env is not None else None,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.started = time.perf_counter()
        self.startup_s = float("nan")  # seconds to the readiness line, set by wait_ready
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            if self.log is not None:
                self.log.write(line)
                self.log.flush()
            if "serving: " in line:
                self.ready.set()

    def wait_ready(self, timeout: float) -> ServerProcess:
        """Wait for the readiness line; a server that exits or takes longer than ``timeout``
        seconds is killed and raises ``RuntimeError`` with the tail of its output."""
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("the server did not start:\n" + "\n".join(self.lines[-40:]))
        self.startup_s = time.perf_counter() - self.started
        return self

    def model_counters(self, model: str) -> dict[str, float]:
        """The Prometheus counters of ``model`` from the metrics endpoint, by metric name
        (e.g. ``nv_inference_exec_count``)."""
        text = urllib.request.urlopen(self.metrics_url, timeout=10).read().decode()
        found = {}
        for line in text.splitlines():
            name = line.split("{", 1)[0]
            if name.startswith("nv_") and f'model="{model}"' in line:
                found[name] = float(line.rsplit(" ", 1)[1])
        return found

    def kill(self) -> None:
        """SIGKILL the whole group."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        self._reader.join(timeout=5)

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM the server process (a graceful shutdown); its exit code. Whatever is left of
        the group afterwards (nothing, if it shut down well) is killed."""
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=5)
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return code
