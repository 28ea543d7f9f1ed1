"""A real `mlflow server` for tests: a subprocess on 127.0.0.1, sqlite backend and artifact folder in a
temp dir, stopped afterwards. It can be stopped and started again on the same port with the same store
(an outage, as the registration loop must survive one).

Fixtures (registered by importing into conftest.py):
    mlflow_server      module: the running server (MlflowServer); .stop() / .start() / .uri
    mlflow_server_uri  function: its http:// tracking URI, the server (re)started if a test left it stopped

Start-up takes 6-20 s on two busy cores, hence one server per test module.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from ports import free_port

_START_TIMEOUT_S = 90


@dataclass
class MlflowServer:
    root: Path
    """Temp dir holding mlflow.db, artifacts/ and server.log."""
    port: int = 0
    host: str = "127.0.0.1"
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def backend_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    def start(self) -> None:
        """Start the server (on the port it had, if it ran before) and wait until /health answers."""
        if self.process is not None and self.process.poll() is None:
            return
        if not self.port:
            self.port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            self.backend_uri,
            "--artifacts-destination",
            str(self.root / "artifacts"),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        log = open(self.root / "server.log", "ab")
        # Its own session: stop() signals the whole group (the CLI process and its uvicorn worker).
        self.process = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.root, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.25)
        tail = (self.root / "server.log").read_text(errors="replace")[-3000:]
        self.stop()
        raise RuntimeError(f"mlflow server did not come up on {self.uri} within {_START_TIMEOUT_S} s:\n{tail}")

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server (SIGTERM, or SIGKILL with kill=True, as a crash) and wait until the port is
        free. The store and artifacts stay. Safe to call when not running."""
        p, self.process = self.process, None
        if p is None or p.poll() is not None:
            return
        try:
            os.killpg(p.pid, signal.SIGKILL if kill else signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=20)
        # The uvicorn worker may outlive its parent briefly; the port must be free before a restart.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                os.killpg(p.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.killpg(p.pid, signal.SIGKILL)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def start_mlflow_server() -> MlflowServer:
    server = MlflowServer(root=Path(tempfile.mkdtemp(prefix="prefixd-mlflow-")))
    atexit.register(server.close)  # also when the session dies before fixture teardown
    try:
        server.start()
    except BaseException:
        server.close()
        raise
    return server


@pytest.fixture(scope="module")
def mlflow_server():
    server = start_mlflow_server()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def mlflow_server_uri(mlflow_server):
    """The server's URI; restarted first if an earlier test left it stopped."""
    mlflow_server.start()
    return mlflow_server.uri
