"""Uploaded data files: the API's /v1/files routes and the `file-<hex>` ids a spec may name as its data.

    files = FileStore("/srv/prefixd")                       # the storage URI (config.storage, else home)
    meta = files.put("alice", "train.jsonl", spool)          # a finished, size-checked local spool file
    meta["id"]                                               # 'file-3f9c...' (32 hex digits)
    files.resolve("alice", meta["id"])                       # '/srv/prefixd/files/alice/file-3f9c.../data.jsonl'
    files.get("bob", meta["id"])                             # None: another tenant's file is not there for bob

Layout: `<storage>/files/<tenant>/<file id>/data<ext>` (ext: the original name's suffix when it is a data
format's, e.g. '.jsonl', so the worker tells the format from it) and `meta.json` beside it (id, name, size,
sha256, created_at, tenant, object), written last: a file exists once its metadata does. The storage may be
local, a shared path or S3 (workers/storage.py); workers read the object through the same storage.

`spool_body` streams a request body to a temporary file in chunks (never the whole body in memory),
answering 413 as soon as more than the limit has been received, whatever the headers said.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import tempfile
import time
from pathlib import PurePosixPath
from typing import Any, BinaryIO

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from jobs.datafiles import _SUFFIXES
from jobs.validate_data import FILE_ID_PATTERN
from workers.storage import JobStorage

MAX_UPLOAD_BYTES = 1 << 30
"""The default limit on one upload (1 GiB); the operator's `max_upload_bytes` setting overrides it."""
MAX_NAME_CHARS = 255
META = "meta.json"


def is_file_id(value: Any) -> bool:
    """Whether `value` has the form of an upload's id, e.g. is_file_id('file-' + 32 * 'a') -> True."""
    return isinstance(value, str) and re.fullmatch(FILE_ID_PATTERN, value) is not None


def check_name(name: str | None) -> str:
    """The original file name if acceptable (a bare name: no folder, no control characters, at most 255
    characters); else HTTP 422 naming the `name` parameter. check_name('qa.csv') -> 'qa.csv'."""
    if not name or not name.strip():
        raise HTTPException(422, "name: the file's name is required, e.g. POST /v1/files?name=train.jsonl")
    if len(name) > MAX_NAME_CHARS or any(ord(ch) < 32 or ch in "/\\" for ch in name) or name in (".", ".."):
        raise HTTPException(
            422,
            f"name: a bare file name of at most {MAX_NAME_CHARS} characters is accepted "
            "(no folders, no control characters), e.g. train.jsonl",
        )
    return name


class FileStore:
    """Uploads in `<storage>/files/<tenant>/<id>/`; see the module docstring. Every method does I/O:
    call it from a worker thread in the API."""

    def __init__(self, storage: str):
        self.root = JobStorage.open(storage).child("files")

    def put(self, tenant: str, name: str, spool: BinaryIO, *, size: int, sha256: str) -> dict[str, Any]:
        """Store the (already received and size-checked) spool file as a new upload; returns its metadata."""
        file_id = "file-" + secrets.token_hex(16)
        suffix = PurePosixPath(name).suffix.lower()
        obj = "data" + (suffix if suffix in _SUFFIXES else "")
        folder = self.root.child(tenant, file_id)
        spool.seek(0)
        folder.put_stream(obj, spool)
        meta = {
            "id": file_id,
            "name": name,
            "size": size,
            "sha256": sha256,
            "created_at": time.time(),
            "tenant": tenant,
            "object": obj,
        }
        folder.write_text(META, json.dumps(meta))
        return meta

    def get(self, tenant: str | None, file_id: str) -> dict[str, Any] | None:
        """The upload's metadata if it exists for `tenant` (None: any tenant's, for an admin); else None."""
        if not is_file_id(file_id):
            return None
        if tenant is not None:
            try:
                return json.loads(self.root.child(tenant, file_id).read_text(META))
            except FileNotFoundError:
                return None
        return next((m for m in self.list(None) if m["id"] == file_id), None)

    def list(self, tenant: str | None) -> list[dict[str, Any]]:
        """Metadata of a tenant's uploads (None: everyone's), oldest first."""
        where = self.root if tenant is None else self.root.child(tenant)
        metas = []
        for rel in where.listing():
            if rel.endswith("/" + META):
                try:
                    metas.append(json.loads(where.read_text(rel)))
                except FileNotFoundError:  # deleted meanwhile
                    continue
        return sorted(metas, key=lambda m: m["created_at"])

    def delete(self, meta: dict[str, Any]) -> None:
        """Remove an upload (metadata first: it is gone for specs at once, then its bytes)."""
        folder = self.root.child(meta["tenant"], meta["id"])
        folder.delete(META)
        folder.delete()

    def resolve(self, tenant: str, file_id: str) -> str | None:
        """The storage path or URI a spec's `file-...` id stands for, for this tenant only; None if it has no
        such upload (unknown, deleted, or another tenant's)."""
        meta = self.get(tenant, file_id)
        return None if meta is None else self.root.child(tenant, file_id, meta["object"]).uri


async def spool_body(request: Request, limit: int) -> tuple[BinaryIO, int, str]:
    """(temporary file holding the body, its size, its sha256), read chunk by chunk; 413 past `limit`
    bytes actually received (a chunked body too), with nothing kept. The caller closes the file."""
    spool = tempfile.TemporaryFile(prefix="prefixd-upload-")
    size, digest = 0, hashlib.sha256()
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPException(
                    413, f"upload over {limit} bytes (the server's max_upload_bytes)", headers={"Connection": "close"}
                )
            digest.update(chunk)
            spool.write(chunk)
    except BaseException:
        spool.close()
        raise
    return spool, size, digest.hexdigest()


class FileOut(BaseModel):
    """One upload's metadata: GET /v1/files/{id}, and the answer to POST /v1/files."""

    id: str
    name: str
    size: int
    sha256: str
    created_at: float
    tenant: str


def _out(meta: dict[str, Any]) -> FileOut:
    return FileOut(**{k: meta[k] for k in FileOut.model_fields})


def files_router(files: FileStore | None, authorize, max_upload_bytes: int, errors: dict) -> APIRouter:
    """The /v1/files routes over `files` (None: no storage configured, every route answers 503).

        POST /v1/files?name=train.jsonl   raw body (application/octet-stream) -> 201 FileOut
        GET /v1/files | GET /v1/files/{id} | DELETE /v1/files/{id}
    Another tenant's file answers 404 as a missing one; an admin sees and deletes every tenant's."""
    router = APIRouter()
    not_found = errors | {404: {"model": _Error}}

    def store() -> FileStore:
        if files is None:
            raise HTTPException(503, "no storage configured for uploads on this server")
        return files

    def visible(file_id: str, caller) -> dict[str, Any]:
        if not is_file_id(file_id):
            raise HTTPException(404, "no such file (a file id is 'file-' and 32 hex digits)")
        meta = store().get(None if caller.admin else caller.tenant, file_id)
        if meta is None:
            raise HTTPException(404, f"no such file: {file_id}")
        return meta

    @router.post(
        "/v1/files",
        status_code=201,
        response_model=FileOut,
        responses=errors | {413: {"model": _Error}, 415: {"model": _Error}, 422: {"model": _Error}},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            }
        },
    )
    async def upload(
        request: Request,
        caller=Depends(authorize),
        name: str = Query(
            ..., max_length=MAX_NAME_CHARS, description="the file's original name; its suffix tells the format"
        ),
    ) -> FileOut:
        """Upload one data file as the raw request body (streamed to storage, at most max_upload_bytes).
        e.g. `curl -H "Authorization: Bearer $T" --data-binary @train.jsonl $URL/v1/files?name=train.jsonl`"""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype.startswith("multipart/"):
            raise HTTPException(
                415,
                "multipart uploads are not accepted: send the file as the raw body "
                "(Content-Type: application/octet-stream) with ?name=FILE",
            )
        check_name(name)
        fs = store()
        spool, size, sha256 = await spool_body(request, max_upload_bytes)
        try:
            meta = await run_in_threadpool(fs.put, caller.tenant, name, spool, size=size, sha256=sha256)
        finally:
            spool.close()
        return _out(meta)

    @router.get("/v1/files", response_model=list[FileOut], responses=errors)
    def list_files(caller=Depends(authorize)) -> list[FileOut]:
        """The caller's uploads (an admin's: everyone's), oldest first."""
        return [_out(m) for m in store().list(None if caller.admin else caller.tenant)]

    @router.get("/v1/files/{file_id}", response_model=FileOut, responses=not_found)
    def get_file(file_id: str, caller=Depends(authorize)) -> FileOut:
        return _out(visible(file_id, caller))

    @router.delete("/v1/files/{file_id}", status_code=204, responses=not_found)
    def delete_file(file_id: str, caller=Depends(authorize)) -> None:
        """Remove an upload; specs naming it are refused from now on (queued jobs naming it will fail)."""
        store().delete(visible(file_id, caller))

    return router


class _Error(BaseModel):
    detail: str
