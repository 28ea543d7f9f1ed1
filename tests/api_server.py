"""The HTTP API as an operator runs it: its own process on 127.0.0.1, configured by the environment.

with api_server(home, {"PREFIXD_API_TOKENS": "alice=tok-a"}) as (url, pid):
    httpx.get(url + "/v1/jobs", headers=auth("tok-a"))
"""

import contextlib
import os
import select
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVER = """
import sys, time
from pathlib import Path
from orchestrator.api_server import start_api
from orchestrator.config import OrchestratorConfig
home = Path(sys.argv[1])
api = start_api(OrchestratorConfig.from_env(home=home, store_url=f"sqlite:///{home / 'jobs.db'}"), port=0)
print(api.url, flush=True)
while True:
    time.sleep(3600)
"""
# Settings an operator's environment may carry that would change what the tests see.
_CLEARED = (
    "PREFIXD_DATA_ROOT",
    "PREFIXD_SPEC_BOUNDS",
    "MLFLOW_TRACKING_URI",
    "PREFIXD_API_TOKENS",
    "PREFIXD_API_TOKENS_FILE",
    "PREFIXD_ADMIN_TOKENS",
    "PREFIXD_ADMIN_TOKENS_FILE",
    "PREFIXD_QUOTAS",
    "PREFIXD_STORAGE",
    "PREFIXD_MAX_UPLOAD_BYTES",
)


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@contextlib.contextmanager
def api_server(home: Path, settings: dict[str, str]):
    """Start the API for `home` with these environment settings (and none of `_CLEARED` otherwise);
    yields (url, pid); killed on exit."""
    env = {k: v for k, v in os.environ.items() if k not in _CLEARED} | {"PYTHONPATH": str(ROOT)} | settings
    process = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(home)], stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env
    )
    try:
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), "the API did not start"
        yield url, process.pid
    finally:
        process.kill()
        process.wait()


def send_chunked(url: str, path: str, token: str, content_type: str, total: int) -> tuple[bytes, int]:
    """POST a chunked body of up to `total` bytes to url+path, stopping as soon as the server answers;
    returns (the response's first bytes, body bytes sent)."""
    host, port = url.split("//")[1].split(":")
    chunk = b"x" * (1 << 16)
    sent, response = 0, b""
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(
            f"POST {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        )
        try:
            while sent < total:
                readable, writable, _ = select.select([s], [s], [], 10)
                if readable:
                    break
                if writable:
                    s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                    sent += len(chunk)
            response = s.recv(4096)
        except OSError:  # the server closed the connection: its answer may still be readable
            try:
                response = s.recv(4096)
            except OSError:
                pass
    return response, sent
