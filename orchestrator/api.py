"""prefixd's HTTP API: submit, list, status, cancel, logs, lookup, models, behind bearer tokens.

    app = create_app(ApiSettings(store_url=..., tokens=frozenset({...}), data_root=Path(...)))
    uvicorn.run(app, host="127.0.0.1", port=8765)          # what `prefixd serve --api` does

- Every /v1 route needs `Authorization: Bearer <token>`: none -> 401, a wrong one -> 403. Tokens come from
  configuration or the environment (PREFIXD_API_TOKENS, comma-separated), never from code. /healthz and
  the OpenAPI description (/openapi.json) are open.
- Specs are validated exactly as `prefixd submit` validates them (jobs/spec.py); a bad spec gets 422 with
  every problem and its field path, and nothing is stored.
- Paths in a spec submitted over HTTP are read on the server, relative to `data_root`, and may not leave
  it (`../`, absolute paths elsewhere, links pointing out are refused): users cannot make the server read
  its other files.
- Request bodies above `max_body_bytes` get 413 before they are read whole.
"""

from __future__ import annotations

import hmac
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.middleware.base import BaseHTTPMiddleware

from jobs.spec import MAX_SPEC_BYTES, SpecError, parse_spec
from orchestrator.store import STATES, InvalidTransition, JobStore, UnknownJob

TOKENS_ENV = "PREFIXD_API_TOKENS"
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
    id: str
    task: str
    state: str
    priority: int
    base_key: str
    attempts: int
    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    tokens_per_s: float | None = None
    error: str | None = None
    result_dir: str | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    registered: bool = False
    registry_model: str | None = None
    registry_version: str | None = None


class SubmitOut(BaseModel):
    job_id: str
    task: str


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
    return JobOut(**{k: data.get(k) for k in JobOut.model_fields if k in data} |
                  {"registry_version": None if data.get("registry_version") is None else str(data["registry_version"])})


# ---------------------------------------------------------------------------------------------- app


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
        except UnknownJob:
            raise HTTPException(404, f"no job {job_id!r}") from None

    errors = {401: {"model": Error}, 403: {"model": Error}}
    if settings.tracking_uri:
        global registry
        from orchestrator import registry  # MLflow takes seconds to import: once, at start, only when used

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict:
        return {"ok": True}

    @app.post("/v1/jobs", status_code=201, response_model=SubmitOut, dependencies=[Depends(authorize)],
              responses=errors | {422: {"model": SpecProblems}, 413: {"model": Error}},
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": {"type": "object"}},
                  "application/yaml": {"schema": {"type": "string"}}}}})
    async def submit(request: Request) -> SubmitOut:
        """Submit one job spec (JSON object, or YAML text with content type application/yaml)."""
        raw = await request.body()
        if len(raw) > settings.max_body_bytes:
            raise HTTPException(413, f"request body over {settings.max_body_bytes} bytes")
        obj = _parse_body(raw, request.headers.get("content-type", ""))
        try:
            spec = parse_spec(obj, base_dir=data_root, source="request body")
        except SpecError as e:
            return JSONResponse(status_code=422, content={
                "detail": str(e), "problems": [{"path": p.path, "message": p.message} for p in e.problems]})
        outside = _paths_outside(spec, data_root)
        if outside:
            return JSONResponse(status_code=422, content={
                "detail": "paths outside the server's data root", "problems": outside})
        job_id = store.submit(spec.to_dict(), task=spec.name, base_key=spec.base_model.base_key,
                              priority=spec.priority, max_attempts=settings.max_attempts)
        return SubmitOut(job_id=job_id, task=spec.name)

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
