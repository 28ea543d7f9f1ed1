"""prefixd's HTTP API: submit, list, status, cancel, logs, events, lookup, models; bearer tokens, per tenant.

    PREFIXD_API_TOKENS="alice=tok-a,bob=tok-b" PREFIXD_ADMIN_TOKENS="ops=tok-o" \
        prefixd serve --api [--host 127.0.0.1] [--port 8000] [--data-root DIR]

    api = start_api(config, port=8000)        # orchestrator/api_server.py: uvicorn in a thread
    api.url, api.stop()
    app = create_app(ApiSettings(store_url=..., callers=parse_entries(["alice=tok-a"]), data_root=Path(...)))

`orchestrator/client.py` (ApiClient) and `prefixd --server URL ...` talk to it.

- Every /v1 route needs `Authorization: Bearer <token>`: none -> 401, a wrong one -> 403. A token names a
  tenant (orchestrator/tenants.py: `name=token` pairs, a bare token is a tenant of its own; tokens come
  from the environment or token files, never from code). /healthz and /openapi.json are open.
- Tenants. Each job records the tenant that submitted it. list, status, cancel, logs and events see only
  the caller's own jobs: another tenant's job answers 404 exactly as a job that does not exist. Admin tokens
  (PREFIXD_ADMIN_TOKENS) see and control every job. The registry routes (/v1/models) read the shared
  registry; writing to it happens only through a tenant's own jobs (orchestrator/registry/: a registered
  model belongs to the tenant that created it). A spec naming another tenant's model is refused (422).
- Quotas (the operator's, `tenant_quotas` / PREFIXD_QUOTAS): a submission past the tenant's max_queued or
  max_priority gets 429 with the limit named; max_running holds its further jobs in the queue (their
  `waiting` says so).
- Events: GET /v1/jobs/{id}/events?after=ID&limit=N -> {"data": [...], "has_more": bool}, each event
  {id, created_at, level, message, type: message|metrics, data}; /logs is the message events' older view.
- Specs are read by the same hardened reader as spec files (jobs/reader.py: YAML 1.2, duplicate keys,
  tags, aliases, depth, size) and validated as `prefixd submit` validates them, within the operator's
  bounds (jobs/bounds.py); a bad spec gets 422 with every problem and its field path, and nothing is
  stored. POST /v1/specs/validate checks one without queueing it.
- Paths in a spec are read on the server, relative to `data_root` (start_api: the data_root argument, else
  $PREFIXD_DATA_ROOT, else <home>/data). Each is resolved (links followed) and must exist inside it, checked
  before any file is opened; any other path gets one answer that tells nothing about it, and no refusal
  quotes a file's bytes.
- Uploads (orchestrator/files.py): POST /v1/files?name=train.jsonl takes one data file as the raw body,
  streamed to `<storage>/files/<tenant>/` (at most `max_upload_bytes`, 413 past it), and answers its id
  `file-<hex>`; GET /v1/files, GET and DELETE /v1/files/{id} (a tenant's own files; an admin's: all). A
  spec's data.train / data.validation may name such an id: it is read from storage, for the caller's
  tenant only; an unknown, deleted or other tenant's id is refused (422) naming the field.
- Request bodies: over `max_body_bytes` (an upload: `max_upload_bytes`) gets 413, by Content-Length before anything is read and by the
  bytes actually received otherwise (a chunked body is read only up to the limit).
- start_api refuses to start without a token, and warns when it listens on a non-loopback address
  (plain HTTP: put a TLS proxy in front of it).
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from jobs.bounds import SpecBounds
from jobs.spec import MAX_SPEC_BYTES, SpecError, parse_document, parse_specs
from jobs.spec import Problem as SpecProblem
from jobs.sweep import job_entries
from orchestrator.api_models import (
    Error,
    EventOut,
    EventsOut,
    JobOut,
    LogLine,
    SpecOut,
    SpecProblems,
    SubmitOut,
    job_out,
)
from orchestrator.files import MAX_UPLOAD_BYTES, FileStore, files_router, is_file_id
from orchestrator.store import MAX_EVENTS, STATES, InvalidTransition, JobStore, Quota, QuotaExceeded, UnknownJob
from orchestrator.tenants import LOCAL_TENANT, Caller

registry: Any = None  # orchestrator.registry, imported by create_app when a tracking URI is configured


@dataclass(frozen=True, kw_only=True)
class ApiSettings:
    store_url: str
    """SQLAlchemy URL of the job store the API reads and writes."""
    callers: Mapping[str, Caller]
    """Accepted bearer tokens -> the tenant (and role) each acts as; empty refuses every /v1 request."""
    data_root: Path
    """Folder that relative data paths in submitted specs are read from; specs cannot leave it."""
    tenant_data_dirs: bool = False
    """True: a tenant's specs read from <data_root>/<tenant>/ only (admins: all of data_root)."""
    tracking_uri: str | None = None
    """MLflow tracking URI for /v1/models; None: those routes answer 503."""
    max_body_bytes: int = MAX_SPEC_BYTES
    files_storage: str | None = None
    """Storage URI uploads are kept under (<it>/files/<tenant>/); None: /v1/files answers 503."""
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    """Most bytes one upload (POST /v1/files) may hold; default 1 GiB."""
    max_attempts: int = 3
    estimate_cache: str | None = None
    """Where POST /v1/specs/estimate keeps tokenized data (the orchestrator's data cache); None: datasets'."""
    model_cache: str | None = None
    """Where built-in base models are converted (the orchestrator's model cache); None: the default."""
    bounds: SpecBounds = field(default_factory=SpecBounds)
    """The operator's upper bounds on spec numbers."""
    quotas: Mapping[str, Quota] = field(default_factory=dict)
    """Per-tenant quotas ('*': every tenant not named; admins and the local tenant are exempt unless named)."""
    serving: Any = None
    """An orchestrator.serving_models.ModelCatalog: its OpenAI routes are mounted under /openai (/openai/v1/...)."""


# ---------------------------------------------------------------------------------------------- app


class _SpecRefused(Exception):
    """A submitted spec that is not accepted: answered 422 with every problem."""

    def __init__(self, detail: str, problems: list[dict]):
        super().__init__(detail)
        self.detail, self.problems = detail, problems


class _BodyLimit:
    """413 for a request whose Content-Length is over the limit, before the app reads a byte (plain ASGI:
    nothing is buffered). A body without Content-Length is limited where it is read (`_read_body`,
    `files.spool_body`). An upload (POST /v1/files) has its own limit, upload_limit."""

    def __init__(self, app, limit: int, upload_limit: int):
        self.app, self.limit, self.upload_limit = app, limit, upload_limit

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            limit = self.upload_limit if scope["path"].rstrip("/") == "/v1/files" else self.limit
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > limit):
                await JSONResponse(
                    {"detail": f"request body over {limit} bytes"}, status_code=413, headers={"Connection": "close"}
                )(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, reading at most limit + 1 bytes of it whatever the headers say; 413 past the limit."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"request body over {limit} bytes", headers={"Connection": "close"})
        chunks.append(chunk)
    return b"".join(chunks)


def bearer_authorizer(callers: Mapping[str, Caller]):
    """The FastAPI dependency that maps `Authorization: Bearer <token>` to its Caller: none -> 401, a token
    not in `callers` -> 403 (the job API's and orchestrator/serving.py's routes share it)."""
    bearer = HTTPBearer(auto_error=False)

    def authorize(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Caller:
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
        given = credentials.credentials.encode()
        found = None
        for token, caller in callers.items():  # every token compared, in constant time each
            if hmac.compare_digest(given, token.encode()):
                found = caller
        if found is None:
            raise HTTPException(403, "token not accepted")
        return found

    return authorize


def create_app(settings: ApiSettings) -> FastAPI:
    app = FastAPI(title="prefixd", version="1", description=__doc__)
    app.add_middleware(_BodyLimit, limit=settings.max_body_bytes, upload_limit=settings.max_upload_bytes)
    store = JobStore(settings.store_url)
    store.set_quotas(_quota_table(settings))
    data_root = settings.data_root.resolve()
    files = FileStore(settings.files_storage) if settings.files_storage else None
    authorize = bearer_authorizer(settings.callers)

    def visible_job(job_id: str, caller: Caller):
        """The job if the caller may see it (its own, or any for an admin); else 404 as for no such job."""
        try:
            job = store.get(job_id)
        except UnknownJob as e:
            raise HTTPException(404, str(e)) from None
        if not caller.admin and job.tenant != caller.tenant:
            raise HTTPException(404, str(UnknownJob(job_id)))
        return job

    errors = {401: {"model": Error}, 403: {"model": Error}}
    if settings.tracking_uri:
        global registry
        from orchestrator import registry  # MLflow takes seconds to import: once, at start, only when used

        try:  # MLflow's first call on a store sets its database up (seconds): here, not in the first request
            registry.prepare_tracking_store(settings.tracking_uri)
        except Exception:  # noqa: BLE001 - MLflow unreachable now: submissions do not wait on it (see below)
            pass

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict:
        return {"ok": True}

    spec_body = {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"type": "object"}},
                "application/yaml": {"schema": {"type": "string"}},
            },
        }
    }
    spec_refusals = errors | {422: {"model": SpecProblems}, 413: {"model": Error}}

    @app.exception_handler(_SpecRefused)
    async def spec_refused(request: Request, e: _SpecRefused) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": e.detail, "problems": e.problems})

    def resolve_file(file_id: str, caller: Caller) -> str | None:
        """A spec's `file-...` id -> the caller's upload's storage path/URI; None when it has none."""
        return files.resolve(caller.tenant, file_id) if files is not None and is_file_id(file_id) else None

    def data_root_of(caller: Caller) -> Path:
        """Where the caller's spec paths are read: its own folder of the data root when tenants have one."""
        if settings.tenant_data_dirs and not caller.admin:
            return data_root / caller.tenant  # a missing folder refuses every path, as an empty one does
        return data_root

    def check_spec(raw: bytes, content_type: str, caller: Caller) -> list[tuple[str | None, Any]]:
        """Parse and validate (in a worker thread: it may read files): [(variant label, JobSpec)], one
        without a sweep; raises _SpecRefused."""
        try:
            obj = parse_document(raw, "request body", fmt="json" if "json" in content_type else "yaml")
            root = data_root_of(caller)
            variants = parse_specs(
                obj,
                base_dir=root,
                data_root=root,
                source="request body",
                bounds=settings.bounds,
                files=lambda file_id: resolve_file(file_id, caller),
            )
            foreign = _foreign_names(settings, variants[0][1], caller.tenant)  # variants share their names
            if foreign:
                raise SpecError("request body", foreign)
        except SpecError as e:
            raise _SpecRefused(str(e), [{"path": p.path, "message": p.message} for p in e.problems]) from None
        return variants

    async def read_spec(request: Request, caller: Caller) -> list[tuple[str | None, Any]]:
        """The body as validated JobSpec variants whose paths stay in the data root; raises _SpecRefused (422)."""
        raw = await _read_body(request, settings.max_body_bytes)
        return await run_in_threadpool(check_spec, raw, request.headers.get("content-type", ""), caller)

    @app.post(
        "/v1/jobs",
        status_code=201,
        response_model=SubmitOut,
        responses=spec_refusals | {429: {"model": Error}},
        openapi_extra=spec_body,
    )
    async def submit(
        request: Request,
        caller: Caller = Depends(authorize),
        max_attempts: int | None = Query(None, ge=1, le=100, description="default: the server's setting"),
    ) -> SubmitOut:
        """Submit one job spec (JSON object, or YAML text with content type application/yaml); a spec with a
        `sweep:` section queues each of its variants as a job, linked by one sweep id."""
        variants = await read_spec(request, caller)
        entries = job_entries(variants, max_attempts=max_attempts or settings.max_attempts, tenant=caller.tenant)
        try:
            ids = await run_in_threadpool(store.submit_many, entries, enforce_quota=not caller.admin)
        except QuotaExceeded as e:
            raise HTTPException(429, str(e)) from None
        labels = [label for label, _ in variants]
        return SubmitOut(
            job_id=ids[0], task=entries[0]["task"], job_ids=ids, sweep_id=entries[0]["sweep_id"], variants=labels
        )

    @app.post("/v1/specs/validate", response_model=SpecOut, responses=spec_refusals, openapi_extra=spec_body)
    async def validate(request: Request, caller: Caller = Depends(authorize)) -> SpecOut:
        """Check one job spec as POST /v1/jobs would, without queueing it."""
        variants = await read_spec(request, caller)
        spec = variants[0][1]
        return SpecOut(
            task=spec.name, base_key=spec.base_model.base_key, priority=spec.priority, variants=len(variants)
        )

    @app.post("/v1/specs/estimate", responses=spec_refusals, openapi_extra=spec_body)
    async def estimate(request: Request, caller: Caller = Depends(authorize)) -> list[dict[str, Any]]:
        """What a spec (each variant of a sweep) will cost before it runs: tokens from its data, time at its
        base model's measured throughput (or a stated default), modelled peak memory (orchestrator/estimates.py)."""
        variants = await read_spec(request, caller)
        return await run_in_threadpool(estimate_variants, variants)

    def estimate_variants(variants: list[tuple[str | None, Any]]) -> list[dict[str, Any]]:
        from orchestrator.estimates import estimate_spec, measured_throughput  # torch: only when asked

        running = store.list(state="running")
        out = []
        for label, spec in variants:
            throughput = measured_throughput(running, spec.base_model.base_key)
            try:
                report = estimate_spec(
                    spec, throughput=throughput, data_cache=settings.estimate_cache, model_cache=settings.model_cache
                )
            except ValueError as e:  # ModelLoadError, DataError: the spec was valid, its model or data is not
                raise HTTPException(422, f"cannot estimate: {e}") from None
            out.append(report | {"variant": label})
        return out

    @app.get("/v1/jobs", response_model=list[JobOut], responses=errors)
    def list_jobs(
        caller: Caller = Depends(authorize),
        state: str | None = Query(None, description=f"one of {', '.join(STATES)}"),
        task: str | None = Query(None, max_length=64),
        limit: int | None = Query(None, ge=1, le=10000),
        sweep: str | None = Query(None, max_length=64, description="only the variants of this sweep"),
    ) -> list[JobOut]:
        """The caller's jobs (an admin's: everyone's), in submission order."""
        if state is not None and state not in STATES:
            raise HTTPException(422, f"state {state!r}; accepted: {', '.join(STATES)}")
        tenant = None if caller.admin else caller.tenant
        return [job_out(j) for j in store.list(state=state, task=task, limit=limit, tenant=tenant, sweep=sweep)]

    @app.get("/v1/jobs/{job_id}", response_model=JobOut, responses=errors | {404: {"model": Error}})
    def status(job_id: str, caller: Caller = Depends(authorize)) -> JobOut:
        return job_out(visible_job(job_id, caller))

    @app.post(
        "/v1/jobs/{job_id}/cancel",
        response_model=JobOut,
        responses=errors | {404: {"model": Error}, 409: {"model": Error}},
    )
    def cancel(job_id: str, caller: Caller = Depends(authorize)) -> JobOut:
        visible_job(job_id, caller)
        try:
            return job_out(store.request_cancel(job_id))
        except InvalidTransition as e:
            raise HTTPException(409, str(e)) from None

    @app.get("/v1/jobs/{job_id}/logs", response_model=list[LogLine], responses=errors | {404: {"model": Error}})
    def logs(job_id: str, caller: Caller = Depends(authorize)) -> list[LogLine]:
        visible_job(job_id, caller)
        return [LogLine(time=t, level=level, message=m) for t, level, m in store.logs(job_id)]

    @app.get("/v1/jobs/{job_id}/events", response_model=EventsOut, responses=errors | {404: {"model": Error}})
    def events(
        job_id: str,
        caller: Caller = Depends(authorize),
        after: int | None = Query(None, ge=0, le=2**63 - 1, description="only events with a larger id"),
        limit: int = Query(100, ge=1, le=MAX_EVENTS),
    ) -> EventsOut:
        """The job's events, oldest first: `after` the last id a reader saw gives exactly the new ones."""
        visible_job(job_id, caller)
        page, more = store.events(job_id, after=after, limit=limit)
        return EventsOut(data=[EventOut(**e.to_dict()) for e in page], has_more=more)

    @app.get("/v1/models", dependencies=[Depends(authorize)], responses=errors | {503: {"model": Error}})
    def models(
        base: str | None = Query(None, max_length=512), tag: list[str] = Query(default=[], description="k=v filters")
    ) -> list[dict]:
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

    @app.get(
        "/v1/models/{task}",
        dependencies=[Depends(authorize)],
        responses=errors | {404: {"model": Error}, 503: {"model": Error}},
    )
    def lookup(
        task: str, alias: str | None = Query(None, max_length=256), version: int | None = Query(None, ge=1)
    ) -> dict:
        uri = _tracking(settings)
        if alias is not None and version is not None:
            raise HTTPException(422, "give alias or version, not both")
        try:
            return registry.lookup(uri, task, alias=alias, version=version)
        except registry.RegistryError as e:
            raise HTTPException(404, str(e)) from None

    app.include_router(files_router(files, authorize, settings.max_upload_bytes, errors))
    if settings.serving is not None:
        from orchestrator.serving import serving_router

        app.include_router(serving_router(settings.serving, authorize), prefix="/openai")
    return app


def _quota_table(settings: ApiSettings) -> dict[str, Quota]:
    """The operator's quotas, plus 'no limit' rows for admins and the local tenant (unless named), so a
    '*' default never applies to them."""
    if not settings.quotas:
        return {}
    exempt = {c.tenant for c in settings.callers.values() if c.admin} | {LOCAL_TENANT}
    return {t: Quota() for t in exempt} | dict(settings.quotas)


def _foreign_names(settings: ApiSettings, spec: Any, tenant: str) -> list[SpecProblem]:
    """A problem for the spec's registered model and its named experiment when MLflow says now that another
    tenant owns them; none when they are free, unknown or MLflow is unreachable (registration checks again,
    and is the authority)."""
    if registry is None or not settings.tracking_uri:
        return []
    checks = {  # field: (the name the spec gives, who owns such a name, the refusal)
        "registry.model_name": (
            spec.registry.model_name if spec.registry.register else None,
            registry.model_owner,
            "is a registered model of another tenant; only its owner adds versions to it: choose a model name "
            "of your own",
        ),
        "registry.experiment": (
            spec.registry.experiment,
            registry.experiment_owner,
            "is an MLflow experiment of another tenant; only its owner logs runs into it: choose an experiment "
            "of your own, or leave it unset",
        ),
    }
    problems = []
    for path, (name, owner_of, refusal) in checks.items():
        if name is None:
            continue
        try:
            owner = owner_of(settings.tracking_uri, name)
        except Exception:  # noqa: BLE001 - MLflow down: the registrar refuses a foreign name anyway
            continue
        if owner is not None and owner != tenant:
            problems.append(SpecProblem(path, f"{name!r} {refusal}"))
    return problems


def _tracking(settings: ApiSettings) -> str:
    if not settings.tracking_uri:
        raise HTTPException(503, "no MLflow tracking URI configured for this server")
    return settings.tracking_uri
