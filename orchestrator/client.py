"""A client for prefixd's HTTP API (orchestrator/api.py); what `prefixd --server URL ...` uses.

    client = ApiClient("http://trainer:8000", token=os.environ["PREFIXD_TOKEN"])
    job_id = client.submit(Path("spec.yaml").read_text())   # YAML text, or a dict (sent as JSON)
    client.status(job_id).state                             # an orchestrator.store.Job, as the store gives it
    client.lookup("past-tense")                             # the champion, as orchestrator.registry.lookup

    meta = client.upload(Path("train.jsonl"))               # streamed; {'id': 'file-...', 'name', 'size', ...}
    client.submit({... "data": {"train": meta["id"], ...}})  # a spec may name an uploaded file by its id

Paths in a submitted spec are read by the server, relative to ITS data root (`prefixd serve --api
--data-root DIR`; default $PREFIXD_DATA_ROOT, else <server home>/data), never to the spec file here: local
data files are uploaded first (`upload`; `prefixd --server URL submit` does it for the files a spec names);
base-model folders must already be on the server. The token names a tenant: list, status, cancel, logs and
events see its jobs only (an admin's: everyone's); another tenant's job answers 404 as a missing one does.
`lookup` and `search_models` are orchestrator.commands.registry.Registry's, so `prefixd lookup` and
`prefixd models` run the same code against a server as locally.

Every refusal raises ApiError with the HTTP status (None when the server cannot be reached) and the
server's detail; a refused spec (422) also carries every problem as (field path, message) pairs, printed
one per line; a quota refusal is 429, its detail naming the limit. Each call is one request.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from orchestrator.store import Job, JobEvent

_JOB_FIELDS = tuple(f.name for f in dataclasses.fields(Job))


class ApiError(Exception):
    """The server refused a request (status_code: its HTTP status), or could not be reached (None)."""

    def __init__(self, status_code: int | None, detail: str, problems: list[tuple[str, str]] | None = None):
        self.status_code = status_code
        self.detail = detail
        self.problems = list(problems or [])
        lines = [detail] + [f"  {path}: {message}" if path else f"  {message}" for path, message in self.problems]
        super().__init__("\n".join(lines))


class ApiClient:
    """prefixd's API at `url` (e.g. 'http://trainer:8000') with one bearer token."""

    def __init__(self, url: str, token: str, *, timeout_s: float = 60.0):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"server URL {url!r}: expected http://HOST:PORT or https://HOST:PORT")
        self.url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"}
        self.timeout_s = timeout_s

    # ---- jobs -------------------------------------------------------------------------------------------

    def submit(self, spec: str | bytes | Mapping[str, Any], *, max_attempts: int | None = None) -> str:
        """Queue one spec (YAML text, or a dict sent as JSON); returns the job id (a sweep's: its first)."""
        return self.submit_jobs(spec, max_attempts=max_attempts)["job_id"]

    def submit_jobs(self, spec: str | bytes | Mapping[str, Any], *, max_attempts: int | None = None) -> dict[str, Any]:
        """Queue one spec, a sweep's variants included: {'job_id', 'task', 'job_ids', 'sweep_id', 'variants'}."""
        params = {} if max_attempts is None else {"max_attempts": max_attempts}
        return self._call("POST", "/v1/jobs", params=params, **_spec_body(spec))

    def validate(self, spec: str | bytes | Mapping[str, Any]) -> dict[str, Any]:
        """Check one spec on the server without queueing it: {'task', 'base_key', 'priority', 'variants'}."""
        return self._call("POST", "/v1/specs/validate", **_spec_body(spec))

    def estimate(self, spec: str | bytes | Mapping[str, Any]) -> list[dict[str, Any]]:
        """What the spec (each variant of a sweep) will cost (orchestrator/estimates.py), without queueing it."""
        return self._call("POST", "/v1/specs/estimate", **_spec_body(spec))

    def list(
        self, state: str | None = None, task: str | None = None, limit: int | None = None, sweep: str | None = None
    ) -> list[Job]:
        """Jobs in submission order (JobStore.list's filters)."""
        given = (("state", state), ("task", task), ("limit", limit), ("sweep", sweep))
        params = {k: v for k, v in given if v is not None}
        return [_job(row) for row in self._call("GET", "/v1/jobs", params=params)]

    def status(self, job_id: str) -> Job:
        return _job(self._call("GET", f"/v1/jobs/{quote(job_id, safe='')}"))

    def cancel(self, job_id: str) -> Job:
        """A queued job is cancelled at once; a running one gets cancel_requested (stops at its next step)."""
        return _job(self._call("POST", f"/v1/jobs/{quote(job_id, safe='')}/cancel"))

    def logs(self, job_id: str) -> list[tuple[float, str, str]]:
        """(time, level, message), oldest first, as JobStore.logs."""
        return [
            (e["time"], e["level"], e["message"]) for e in self._call("GET", f"/v1/jobs/{quote(job_id, safe='')}/logs")
        ]

    def events(self, job_id: str, *, after: int | None = None, limit: int = 100) -> tuple[list[JobEvent], bool]:
        """(the job's events with an id above `after`, oldest first, at most `limit`; whether more follow),
        as JobStore.events."""
        params = {"limit": limit} | ({} if after is None else {"after": after})
        page = self._call("GET", f"/v1/jobs/{quote(job_id, safe='')}/events", params=params)
        return [JobEvent(**e) for e in page["data"]], page["has_more"]

    # ---- uploads ----------------------------------------------------------------------------------------

    def upload(self, path: str | Path, name: str | None = None) -> dict[str, Any]:
        """Upload one local data file, streamed (never read whole); returns its metadata, e.g.
        {'id': 'file-3f9c...', 'name': 'train.jsonl', 'size': 1234, 'sha256': ..., 'tenant': 'alice'}."""
        path = Path(path)
        with open(path, "rb") as f:
            return self._call(
                "POST",
                "/v1/files",
                params={"name": name or path.name},
                content=f,
                headers={"Content-Type": "application/octet-stream"},
            )

    def files(self) -> list[dict[str, Any]]:
        """The caller's uploads (an admin's: everyone's), oldest first."""
        return self._call("GET", "/v1/files")

    def file(self, file_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/files/{quote(file_id, safe='')}")

    def delete_file(self, file_id: str) -> None:
        self._call("DELETE", f"/v1/files/{quote(file_id, safe='')}")

    # ---- registry ---------------------------------------------------------------------------------------

    def lookup(self, task: str, alias: str | None = None, version: int | str | None = None) -> dict[str, Any]:
        """One registered version (orchestrator.registry.lookup's dict); neither alias nor version: the champion."""
        params = {k: v for k, v in (("alias", alias), ("version", version)) if v is not None}
        return self._call("GET", f"/v1/models/{quote(task, safe='')}", params=params)

    def search_models(self, base: str | None = None, tags: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        """Registered prefixd models (orchestrator.registry.search_models's dicts)."""
        params: list[tuple[str, str]] = [("base", base)] if base is not None else []
        params += [("tag", f"{k}={v}") for k, v in (tags or {}).items()]
        return self._call("GET", "/v1/models", params=params)

    # ---- one request ------------------------------------------------------------------------------------

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = httpx.request(
                method,
                self.url + path,
                headers=self._headers | kwargs.pop("headers", {}),
                timeout=self.timeout_s,
                **kwargs,
            )
        except httpx.TransportError as e:
            raise ApiError(None, f"cannot reach the prefixd server at {self.url}: {e or type(e).__name__}") from None
        if response.is_success:
            return response.json() if response.content else None
        raise _error(response, self.url)


def _spec_body(spec: str | bytes | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(spec, Mapping):
        return {"json": dict(spec)}
    text = spec.encode("utf-8") if isinstance(spec, str) else spec
    return {"content": text, "headers": {"Content-Type": "application/yaml"}}


def _job(row: Mapping[str, Any]) -> Job:
    # Every Job field; one an older server does not send is None.
    return Job(**{name: row.get(name) for name in _JOB_FIELDS})


def _error(response: httpx.Response, url: str) -> ApiError:
    """The server's refusal as an ApiError: its `detail`, and the spec problems of a 422."""
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    detail = body.get("detail") if isinstance(body, dict) else None
    problems: list[tuple[str, str]] = []
    if isinstance(body, dict) and isinstance(body.get("problems"), list):
        problems = [(str(p.get("path", "")), str(p.get("message", ""))) for p in body["problems"]]
    if isinstance(detail, list):  # FastAPI's own request validation: [{'loc': [...], 'msg': ...}, ...]
        problems = [(".".join(str(part) for part in d.get("loc", [])[1:]), str(d.get("msg", ""))) for d in detail]
        detail = "the server refused the request's parameters"
    if not isinstance(detail, str):
        detail = (response.text or response.reason_phrase)[:500]
    if status in (401, 403):
        detail = f"{url} refused the token (HTTP {status}: {detail})"
    elif status >= 500:
        detail = f"{url} failed (HTTP {status}): {detail}"
    return ApiError(status, detail, problems)
