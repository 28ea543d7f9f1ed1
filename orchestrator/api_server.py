"""Starting prefixd's HTTP API (orchestrator/api.py): settings from the config and the environment, a
listening socket, uvicorn in a daemon thread.

    PREFIXD_API_TOKENS="alice=tok-a,bob=tok-b" PREFIXD_ADMIN_TOKENS="ops=tok-o" \\
        prefixd serve --api [--host 127.0.0.1] [--port 8000] [--data-root DIR]

    api = start_api(config, port=8000)        # returns once it listens
    api.url, api.stop()

- Tokens: the arguments, else $PREFIXD_API_TOKENS / $PREFIXD_ADMIN_TOKENS (and their _FILE forms); with none
  start_api raises ApiStartError: the API never serves unauthenticated.
- data_root: the argument, else $PREFIXD_DATA_ROOT, else <home>/data; $PREFIXD_TENANT_DATA_DIRS=1 gives each
  tenant <data_root>/<tenant>/. Uploads: at most max_upload_bytes each, else $PREFIXD_MAX_UPLOAD_BYTES, else 1 GiB.
- A host that is not a loopback address gets a warning on stderr (plain HTTP: put a TLS proxy in front of it).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn

from jobs.bounds import SpecBounds
from orchestrator.api import ApiSettings, create_app
from orchestrator.files import MAX_UPLOAD_BYTES
from orchestrator.tenants import (
    ADMIN_TOKENS_ENV,
    TOKENS_ENV,
    Caller,
    callers_from_env,
    check_quotas,
    merge_callers,
    parse_entries,
)

if TYPE_CHECKING:
    from orchestrator.config import OrchestratorConfig

DATA_ROOT_ENV = "PREFIXD_DATA_ROOT"
TENANT_DATA_DIRS_ENV = "PREFIXD_TENANT_DATA_DIRS"
MAX_UPLOAD_ENV = "PREFIXD_MAX_UPLOAD_BYTES"


def tokens_from_env() -> dict[str, Caller]:
    """{token: Caller} from the environment (orchestrator/tenants.py); ValueError on a conflicting entry."""
    return callers_from_env()


class ApiStartError(RuntimeError):
    """The API cannot start: no token configured, or the address cannot be listened on."""


@dataclass(frozen=True, kw_only=True)
class ApiHandle:
    """A running API (start_api): uvicorn serving in a daemon thread of this process."""

    url: str
    """Where it answers, e.g. 'http://127.0.0.1:8000' (the real port when started with port=0)."""
    data_root: Path
    """The folder relative spec paths are read from."""
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self, timeout_s: float = 10.0) -> None:
        """Finish the requests in flight and stop listening."""
        self.server.should_exit = True
        self.thread.join(timeout_s)


def start_api(
    config: OrchestratorConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    tokens: Iterable[str] | None = None,
    admin_tokens: Iterable[str] | None = None,
    data_root: str | Path | None = None,
    max_upload_bytes: int | None = None,
    startup_timeout_s: float = 60.0,
    serving: Any = None,
) -> ApiHandle:
    """Serve create_app over the config's job store and MLflow registry; returns once it listens.

    tokens / admin_tokens: 'name=token' or bare-token entries (orchestrator/tenants.py); when neither is
    given, the environment's ($PREFIXD_API_TOKENS, $PREFIXD_ADMIN_TOKENS and their _FILE forms). No token at
    all raises ApiStartError (the API never serves unauthenticated). data_root: default $PREFIXD_DATA_ROOT,
    else <config.home>/data (created); with $PREFIXD_TENANT_DATA_DIRS=1 each tenant reads <data_root>/<tenant>/. Uploads are kept under config.storage (else the home folder), at most
    max_upload_bytes each (default $PREFIXD_MAX_UPLOAD_BYTES, else 1 GiB). Bounds and quotas come from config.spec_bounds and
    config.tenant_quotas. port 0 picks a free port (see .url). A host that is not a loopback address prints
    a warning on stderr: the API is then reachable from other machines over plain HTTP. serving: a
    ModelCatalog (orchestrator/serving_models.py) whose OpenAI routes are mounted at /openai.

        api = start_api(config, port=0, tokens=["alice=tok-a", "bob=tok-b"], admin_tokens=["ops=tok-o"])
    """
    try:
        if tokens is None and admin_tokens is None:
            callers = tokens_from_env()
        else:
            callers = merge_callers(parse_entries(tokens or ()), parse_entries(admin_tokens or (), admin=True))
        quotas = check_quotas(config.tenant_quotas)
        bounds = SpecBounds(config.spec_bounds)
        upload_limit = _upload_limit(max_upload_bytes)
    except ValueError as e:
        raise ApiStartError(str(e)) from None
    if not callers:
        raise ApiStartError(
            f"no API token configured: set {TOKENS_ENV} (or {ADMIN_TOKENS_ENV}) to one or more "
            "bearer tokens (comma-separated); the HTTP API does not serve without one"
        )
    root = Path(data_root or os.environ.get(DATA_ROOT_ENV) or config.home / "data").expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    settings = ApiSettings(
        store_url=config.store_url,
        callers=callers,
        data_root=root,
        tenant_data_dirs=os.environ.get(TENANT_DATA_DIRS_ENV, "").strip().lower() in ("1", "true", "yes"),
        tracking_uri=config.tracking_uri,
        max_attempts=config.max_attempts,
        estimate_cache=str(config.data_cache),
        model_cache=str(config.model_cache),
        bounds=bounds,
        quotas=quotas,
        files_storage=str(config.storage or config.home),
        max_upload_bytes=upload_limit,
        serving=serving,
    )
    sock = listen_socket(host, port)
    try:
        app = create_app(settings)
    except BaseException:
        sock.close()
        raise
    server, thread = serve_in_thread(app, sock, f"the HTTP API on {host}:{port}", startup_timeout_s)
    bound_port = sock.getsockname()[1]
    if not _is_loopback(host):
        print(
            f"warning: the HTTP API listens on {host}:{bound_port}, reachable from other machines, over "
            "plain HTTP: put a TLS proxy in front of it so tokens do not cross the network in clear text",
            file=sys.stderr,
            flush=True,
        )
    shown = f"[{host}]" if ":" in host else host
    return ApiHandle(url=f"http://{shown}:{bound_port}", data_root=root, server=server, thread=thread)


def serve_in_thread(app, sock: socket.socket, what: str, startup_timeout_s: float = 60.0):
    """(uvicorn.Server, daemon thread) serving `app` on the bound socket, once it listens; ApiStartError
    naming `what` when it does not start in time."""
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="prefixd-api", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise ApiStartError(f"{what} did not start (see the log above)")
        time.sleep(0.02)
    return server, thread


def _upload_limit(given: int | None) -> int:
    """max_upload_bytes: the argument, else $PREFIXD_MAX_UPLOAD_BYTES, else 1 GiB; ValueError if not >= 1."""
    raw = given if given is not None else os.environ.get(MAX_UPLOAD_ENV) or MAX_UPLOAD_BYTES
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"max_upload_bytes ({MAX_UPLOAD_ENV}): expected a whole number of bytes >= 1, got {raw!r}")
    return value


def listen_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (uvicorn listens on it); a taken port raises ApiStartError at once."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restarts reuse TIME_WAIT
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        hint = "; another process is listening there (choose another --port)" if e.errno == errno.EADDRINUSE else ""
        raise ApiStartError(f"cannot listen on {host}:{port}: {e.strerror or e}{hint}") from None
    return sock


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False
