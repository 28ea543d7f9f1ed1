"""prefixd's HTTP API: submit, list, status, cancel, logs, lookup, models, behind bearer tokens.

    PREFIXD_API_TOKENS=s3cret prefixd serve --api [--host 127.0.0.1] [--port 8000] [--data-root DIR]

    api = start_api(config, port=8000)        # uvicorn in a thread; returns once it listens
    api.url, api.stop()
    app = create_app(ApiSettings(store_url=..., tokens=frozenset({...}), data_root=Path(...)))  # the app alone

`orchestrator/client.py` (ApiClient) and `prefixd --server URL ...` talk to it.

- Every /v1 route needs `Authorization: Bearer <token>`: none -> 401, a wrong one -> 403. Tokens come from
  configuration or the environment (PREFIXD_API_TOKENS, comma-separated), never from code. /healthz and
  the OpenAPI description (/openapi.json) are open.
- Specs are validated exactly as `prefixd submit` validates them (jobs/spec.py); a bad spec gets 422 with
  every problem and its field path, and nothing is stored. POST /v1/specs/validate checks one without
  queueing it (the CLI checks every spec first, so a batch is queued all or none).
- Paths in a spec submitted over HTTP are read on the server, relative to `data_root` (start_api: the
  data_root argument, else $PREFIXD_DATA_ROOT, else <home>/data), and may not leave it (`../`, absolute
  paths elsewhere, links pointing out are refused): users cannot make the server read its other files.
  Nothing is uploaded: data files and local base-model folders must already be under the data root.
- start_api refuses to start without a token, and warns when it listens on a non-loopback address
  (plain HTTP: put a TLS proxy in front of it).
- Request bodies above `max_body_bytes` get 413 before they are read whole.
"""

from __future__ import annotations

import errno
import hmac
import ipaddress
import json
import os
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn
import yaml
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from starlette.middleware.base import BaseHTTPMiddleware

from jobs.spec import MAX_SPEC_BYTES, SpecError, parse_spec
from orchestrator.store import STATES, InvalidTransition, JobStore, UnknownJob

if TYPE_CHECKING:
    from orchestrator.config import OrchestratorConfig

TOKENS_ENV = "PREFIXD_API_TOKENS"
DATA_ROOT_ENV = "PREFIXD_DATA_ROOT"
registry: Any = None  # orchestrator.registry, imported by create_app when a tracking URI is configured


@dataclass(frozen=True, kw_only=True)
class ApiSettings:
    store_url: str
    """SQLAlchemy URL of the job store the API reads and writes."""
    tokens: frozenset[str]
    """Accepted bearer tokens; empty refuses every /v1 request."""
    data_root: Path
    """Folder that relative data paths in submitted specs are read from; specs cannot leave it."""
    tracking_uri: str | None = None
    """MLflow tracking URI for /v1/models; None: those routes answer 503."""
    max_body_bytes: int = MAX_SPEC_BYTES
    max_attempts: int = 3


def tokens_from_env() -> frozenset[str]:
    return frozenset(t.strip() for t in os.environ.get(TOKENS_ENV, "").split(",") if t.strip())


# ---------------------------------------------------------------------------------------------- schemas


class JobOut(BaseModel):
    """One job-store row (orchestrator.store.Job), every field: what `prefixd status --json` prints."""
    id: str
    task: str
    base_key: str
    priority: int
    state: str
    spec: dict
    attempts: int
    max_attempts: int
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    updated_at: float
    error: str | None = None
    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    tokens_per_s: float | None = None
    examples_per_s: float | None = None
    result_dir: str | None = None
    cancel_requested: bool = False
    owner: str | None = None
    heartbeat_at: float | None = None
    registered: bool = False
    registry_model: str | None = None
    registry_version: str | None = None
    registration_attempts: int = 0
    registration_error: str | None = None
    next_registration_at: float | None = None
    waiting: str | None = None


class SubmitOut(BaseModel):
    job_id: str
    task: str


class SpecOut(BaseModel):
    """A spec the server accepts, not queued."""
    task: str
    base_key: str
    priority: int


class Problem(BaseModel):
    path: str
    message: str


class SpecProblems(BaseModel):
    detail: str
    problems: list[Problem]


class LogLine(BaseModel):
    time: float
    level: str
    message: str


class Error(BaseModel):
    detail: str


def _job_out(job: Any) -> JobOut:
    data = asdict(job)
    version = data.get("registry_version")
    return JobOut(**{k: data[k] for k in JobOut.model_fields if k in data} |
                  {"registry_version": None if version is None else str(version)})


# ---------------------------------------------------------------------------------------------- app


class _SpecRefused(Exception):
    """A submitted spec that is not accepted: answered 422 with every problem."""

    def __init__(self, detail: str, problems: list[dict]):
        super().__init__(detail)
        self.detail, self.problems = detail, problems


class _BodyLimit(BaseHTTPMiddleware):
    def __init__(self, app, limit: int):
        super().__init__(app)
        self.limit = limit

    async def dispatch(self, request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return JSONResponse({"detail": f"request body over {self.limit} bytes"}, status_code=413)
        return await call_next(request)


def create_app(settings: ApiSettings) -> FastAPI:
    app = FastAPI(title="prefixd", version="1", description=__doc__)
    app.add_middleware(_BodyLimit, limit=settings.max_body_bytes)
    store = JobStore(settings.store_url)
    bearer = HTTPBearer(auto_error=False)
    data_root = settings.data_root.resolve()

    def authorize(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
        if not any(hmac.compare_digest(credentials.credentials.encode(), t.encode()) for t in settings.tokens):
            raise HTTPException(403, "token not accepted")

    def job_or_404(job_id: str):
        try:
            return store.get(job_id)
        except UnknownJob as e:
            raise HTTPException(404, str(e)) from None

    errors = {401: {"model": Error}, 403: {"model": Error}}
    if settings.tracking_uri:
        global registry
        from orchestrator import registry  # MLflow takes seconds to import: once, at start, only when used

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict:
        return {"ok": True}

    spec_body = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"type": "object"}},
        "application/yaml": {"schema": {"type": "string"}}}}}
    spec_refusals = errors | {422: {"model": SpecProblems}, 413: {"model": Error}}

    @app.exception_handler(_SpecRefused)
    async def spec_refused(request: Request, e: _SpecRefused) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": e.detail, "problems": e.problems})

    async def read_spec(request: Request) -> Any:
        """The body as a validated JobSpec whose paths stay in the data root; raises _SpecRefused (422)."""
        raw = await request.body()
        if len(raw) > settings.max_body_bytes:
            raise HTTPException(413, f"request body over {settings.max_body_bytes} bytes")
        obj = _parse_body(raw, request.headers.get("content-type", ""))
        try:
            spec = parse_spec(obj, base_dir=data_root, source="request body")
        except SpecError as e:
            raise _SpecRefused(str(e), [{"path": p.path, "message": p.message} for p in e.problems]) from None
        outside = _paths_outside(spec, data_root)
        if outside:
            raise _SpecRefused("paths outside the server's data root", outside)
        return spec

    @app.post("/v1/jobs", status_code=201, response_model=SubmitOut, dependencies=[Depends(authorize)],
              responses=spec_refusals, openapi_extra=spec_body)
    async def submit(request: Request,
                     max_attempts: int | None = Query(None, ge=1, le=100,
                                                      description="default: the server's setting")) -> SubmitOut:
        """Submit one job spec (JSON object, or YAML text with content type application/yaml)."""
        spec = await read_spec(request)
        job_id = store.submit(spec.to_dict(), task=spec.name, base_key=spec.base_model.base_key,
                              priority=spec.priority, max_attempts=max_attempts or settings.max_attempts)
        return SubmitOut(job_id=job_id, task=spec.name)

    @app.post("/v1/specs/validate", response_model=SpecOut, dependencies=[Depends(authorize)],
              responses=spec_refusals, openapi_extra=spec_body)
    async def validate(request: Request) -> SpecOut:
        """Check one job spec as POST /v1/jobs would, without queueing it."""
        spec = await read_spec(request)
        return SpecOut(task=spec.name, base_key=spec.base_model.base_key, priority=spec.priority)

    @app.get("/v1/jobs", response_model=list[JobOut], dependencies=[Depends(authorize)], responses=errors)
    def list_jobs(state: str | None = Query(None, description=f"one of {', '.join(STATES)}"),
                  task: str | None = Query(None, max_length=64),
                  limit: int | None = Query(None, ge=1, le=10000)) -> list[JobOut]:
        if state is not None and state not in STATES:
            raise HTTPException(422, f"state {state!r}; accepted: {', '.join(STATES)}")
        return [_job_out(j) for j in store.list(state=state, task=task, limit=limit)]

    @app.get("/v1/jobs/{job_id}", response_model=JobOut, dependencies=[Depends(authorize)],
             responses=errors | {404: {"model": Error}})
    def status(job_id: str) -> JobOut:
        return _job_out(job_or_404(job_id))

    @app.post("/v1/jobs/{job_id}/cancel", response_model=JobOut, dependencies=[Depends(authorize)],
              responses=errors | {404: {"model": Error}, 409: {"model": Error}})
    def cancel(job_id: str) -> JobOut:
        job_or_404(job_id)
        try:
            return _job_out(store.request_cancel(job_id))
        except InvalidTransition as e:
            raise HTTPException(409, str(e)) from None

    @app.get("/v1/jobs/{job_id}/logs", response_model=list[LogLine], dependencies=[Depends(authorize)],
             responses=errors | {404: {"model": Error}})
    def logs(job_id: str) -> list[LogLine]:
        job_or_404(job_id)
        return [LogLine(time=t, level=level, message=m) for t, level, m in store.logs(job_id)]

    @app.get("/v1/models", dependencies=[Depends(authorize)], responses=errors | {503: {"model": Error}})
    def models(base: str | None = Query(None, max_length=512),
               tag: list[str] = Query(default=[], description="k=v filters")) -> list[dict]:
        uri = _tracking(settings)
        tags = {}
        for item in tag:
            if "=" not in item:
                raise HTTPException(422, f"tag {item!r}: expected k=v")
            k, v = item.split("=", 1)
            tags[k] = v
        try:
            return registry.search_models(uri, base=base, tags=tags)
        except registry.RegistryError as e:
            raise HTTPException(422, str(e)) from None

    @app.get("/v1/models/{task}", dependencies=[Depends(authorize)],
             responses=errors | {404: {"model": Error}, 503: {"model": Error}})
    def lookup(task: str, alias: str | None = Query(None, max_length=256),
               version: int | None = Query(None, ge=1)) -> dict:
        uri = _tracking(settings)
        if alias is not None and version is not None:
            raise HTTPException(422, "give alias or version, not both")
        try:
            return registry.lookup(uri, task, alias=alias, version=version)
        except registry.RegistryError as e:
            raise HTTPException(404, str(e)) from None

    return app


def _tracking(settings: ApiSettings) -> str:
    if not settings.tracking_uri:
        raise HTTPException(503, "no MLflow tracking URI configured for this server")
    return settings.tracking_uri


def _parse_body(raw: bytes, content_type: str) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPException(422, "request body is not UTF-8 text") from None
    try:
        if "json" in content_type:
            return json.loads(text)
        return yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise HTTPException(422, f"request body is not valid {'JSON' if 'json' in content_type else 'YAML'}: "
                                 f"{str(e).splitlines()[0]}") from None


def _paths_outside(spec: Any, root: Path) -> list[dict]:
    """Spec paths (resolved, links followed) that are not inside the data root."""
    candidates = {"data.train": spec.data.train, "data.validation": spec.data.validation,
                  "base_model.path": spec.base_model.path}
    problems = []
    for field_path, value in candidates.items():
        if value is None:
            continue
        resolved = Path(value).resolve()
        if resolved != root and root not in resolved.parents:
            problems.append({"path": field_path, "message": f"{value} is outside the server's data root"})
    return problems


# ---------------------------------------------------------------------------------------------- serving


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


def start_api(config: OrchestratorConfig, *, host: str = "127.0.0.1", port: int = 8000,
              tokens: frozenset[str] | None = None, data_root: str | Path | None = None,
              startup_timeout_s: float = 60.0) -> ApiHandle:
    """Serve create_app over the config's job store and MLflow registry; returns once it listens.

    tokens: accepted bearer tokens, default $PREFIXD_API_TOKENS; none at all raises ApiStartError (the API
    never serves unauthenticated). data_root: default $PREFIXD_DATA_ROOT, else <config.home>/data (created).
    port 0 picks a free port (see .url). A host that is not a loopback address prints a warning on stderr:
    the API is then reachable from other machines over plain HTTP.
    """
    tokens = frozenset(tokens) if tokens else tokens_from_env()
    if not tokens:
        raise ApiStartError(f"no API token configured: set {TOKENS_ENV} to one or more bearer tokens "
                            "(comma-separated); the HTTP API does not serve without one")
    root = Path(data_root or os.environ.get(DATA_ROOT_ENV) or config.home / "data").expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    settings = ApiSettings(store_url=config.store_url, tokens=tokens, data_root=root,
                           tracking_uri=config.tracking_uri, max_attempts=config.max_attempts)
    sock = _listen_socket(host, port)
    try:
        app = create_app(settings)
    except BaseException:
        sock.close()
        raise
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="prefixd-api", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise ApiStartError(f"the HTTP API on {host}:{port} did not start (see the log above)")
        time.sleep(0.02)
    bound_port = sock.getsockname()[1]
    if not _is_loopback(host):
        print(f"warning: the HTTP API listens on {host}:{bound_port}, reachable from other machines, over "
              "plain HTTP: put a TLS proxy in front of it so tokens do not cross the network in clear text",
              file=sys.stderr, flush=True)
    shown = f"[{host}]" if ":" in host else host
    return ApiHandle(url=f"http://{shown}:{bound_port}", data_root=root, server=server, thread=thread)


def _listen_socket(host: str, port: int) -> socket.socket:
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
