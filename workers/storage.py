"""Where job folders live: a local folder, a shared filesystem, or S3 (S3-compatible endpoints included),
through pyarrow.fs (the layer Ray Train's storage_path uses).

    storage = JobStorage.open("s3://bucket/prefixd?endpoint_override=http://127.0.0.1:9000")
    job = storage.child("jobs", "j-1")                  # s3://bucket/prefixd/jobs/j-1?endpoint_override=...
    name = job.save_checkpoint("/tmp/stage", step=10)  # uploaded whole; visible once its manifest is written
    newest, *older = job.complete_checkpoints()        # newest first
    job.download_checkpoint(newest, "/tmp/restore")    # checked against its manifest (sizes, sha256)
    job.write_text("result.json", "{...}")             # whole or not at all
    uri = storage.put_stream("uploads/qa.csv", request_body, max_bytes=2**30)  # an upload handler's call
    local = fetch("s3://bucket/data/train.jsonl", cache_dir="/var/cache/prefixd")  # a data file, cached

URIs (`ACCEPTED`; parsed in `workers/storage_uri.py`): a local or shared-filesystem path (or file:///path),
or s3://bucket[/prefix] with optional query options region, endpoint_override (host:port or
http(s)://host:port; else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL) and scheme (http | https). Credentials
come from the AWS chain (AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY, AWS_PROFILE, web identity, an instance
role), never from the URI (URIs are stored and logged). Errors are `StorageError`s naming the setting
(`storage`, `data.train`, ...), the URI and what is accepted, never a secret.

A checkpoint is `checkpoints/step-<step>-<token>/` and counts once its manifest `COMPLETE` (each file's
size and sha256), written last, exists; the previous complete one is kept as a fallback.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from workers.storage_uri import (  # noqa: F401 - StorageError, is_uri, is_remote, ACCEPTED: this module's API too
    ACCEPTED,
    StorageError,
    describe_failure,
    filesystem,
    is_remote,
    is_uri,
    join,
    normalize,
)

CHECKPOINTS = "checkpoints"
MANIFEST = "COMPLETE"
_CHECKPOINT_RE = re.compile(r"^step-(\d{9})-[0-9a-f]{8}$")
_CHUNK = 1 << 20


class CheckpointError(StorageError):
    """A checkpoint that does not match its manifest (a file missing, cut short or changed)."""


@dataclass(frozen=True)
class JobStorage:
    """A folder in storage: `uri` is an absolute local path or s3://bucket/key[?options]. Build with `open`."""

    uri: str
    setting: str = "storage"
    """The setting the URI came from, named in every error."""

    @classmethod
    def open(cls, uri: str | os.PathLike, setting: str = "storage") -> JobStorage:
        """Check the URI's form (no I/O) and return its folder; StorageError names `setting` when it is bad."""
        return cls(normalize(str(uri), setting), setting)

    def __str__(self) -> str:
        return self.uri

    @property
    def is_local(self) -> bool:
        return not is_uri(self.uri)

    def child(self, *parts: str) -> JobStorage:
        """The folder (or file) `parts` below this one, with the same options."""
        return JobStorage(join(self.uri, *parts), self.setting)

    # ---- small files ----------------------------------------------------------------------------

    def exists(self, name: str = "") -> bool:
        fs, path = self._fs(name)
        return self._call("look up", name, lambda: fs.get_file_info(path).type != pafs.FileType.NotFound)

    def read_bytes(self, name: str) -> bytes:
        """The file's bytes; FileNotFoundError when it does not exist."""
        fs, path = self._fs(name)
        return self._call("read", name, lambda: _read_all(fs, path))

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode("utf-8")

    def open_input(self, name: str = ""):
        """The file `name` opened for reading in place, seekable (a pyarrow file; use it in a `with`)."""
        fs, path = self._fs(name)
        return self._call("open", name, lambda: fs.open_input_file(path))

    def write_bytes(self, name: str, data: bytes) -> str:
        """Write a file whole or not at all (local: temporary name, fsync, rename; S3: one upload)."""
        return self.put_stream(name, io.BytesIO(data))

    def write_text(self, name: str, text: str) -> str:
        return self.write_bytes(name, text.encode("utf-8"))

    def put_stream(self, name: str, stream: BinaryIO, *, max_bytes: int | None = None) -> str:
        """Store a readable binary stream as the file `name`, visible only once complete (what an upload
        handler calls); returns the file's URI. Past `max_bytes`, StorageError and nothing stored.

        Local storage: a temporary name beside it, fsync'ed and renamed. S3: spooled to a local temporary
        file first, then uploaded in one go (an object exists only once its upload completes)."""
        fs, path = self._fs(name)
        target = self.child(name)
        if self.is_local:
            return self._call("write", name, lambda: _local_put(Path(path), stream, max_bytes, target))
        with tempfile.TemporaryFile() as spool:
            _copy_limited(stream, spool, max_bytes, target)
            spool.seek(0)

            def put() -> None:
                with fs.open_output_stream(path) as out:
                    shutil.copyfileobj(spool, out, _CHUNK)

            self._call("write", name, put)
        return target.uri

    def delete(self, name: str = "") -> None:
        """Remove a file or folder (and everything under it); nothing happens when it is not there."""
        fs, path = self._fs(name)

        def remove() -> None:
            kind = fs.get_file_info(path).type
            if kind == pafs.FileType.Directory:
                fs.delete_dir(path)
            elif kind == pafs.FileType.File:
                fs.delete_file(path)

        self._call("delete", name, remove)

    # ---- whole folders --------------------------------------------------------------------------

    def upload(self, local: str | os.PathLike, name: str) -> str:
        """Copy a local file or folder to `name` (local storage: every file and folder fsync'ed)."""
        local = Path(local)
        files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
        for f in files:
            rel = name if f == local else f"{name}/{f.relative_to(local).as_posix()}"
            fs, path = self._fs(rel)
            self._call("upload", rel, lambda: _copy_in(fs, path, f, self.is_local))
        if self.is_local:
            _fsync_tree(Path(self._fs(name)[1]), stop=Path(self.uri))
        return self.child(name).uri

    def download(self, name: str, local: str | os.PathLike) -> Path:
        """Copy the file or folder `name` to the local path `local`; FileNotFoundError when it is missing."""
        fs, path = self._fs(name)
        local = Path(local)

        def copy() -> None:
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.NotFound:
                raise FileNotFoundError(f"{self.child(name).uri}: no such file or folder")
            if info.type == pafs.FileType.File:
                _copy_out(fs, path, local)
                return
            for entry in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
                if entry.type == pafs.FileType.File:
                    _copy_out(fs, entry.path, local / _relative(entry.path, path))

        self._call("download", name, copy)
        return local

    def listing(self, name: str = "") -> dict[str, tuple[int, float]]:
        """Every file under `name`: relative path -> (size, mtime in seconds); {} when there is nothing."""
        fs, path = self._fs(name)

        def scan() -> dict[str, tuple[int, float]]:
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.File:
                return {"": (info.size, _mtime(info))}
            if info.type == pafs.FileType.NotFound:
                return {}
            return {
                _relative(e.path, path): (e.size, _mtime(e))
                for e in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                if e.type == pafs.FileType.File
            }

        return self._call("list", name, scan)

    def check(self) -> None:
        """Reach the storage and write, read and delete a probe file; StorageError says what failed."""
        fs, path = self._fs("")
        if not self.is_local:
            bucket = path.split("/", 1)[0]
            if self._call("look up the bucket of", "", lambda: fs.get_file_info(bucket).type) == pafs.FileType.NotFound:
                raise StorageError(
                    f"{self.setting}: {self.uri}: the bucket {bucket!r} does not exist (create it "
                    "first; prefixd never creates buckets)"
                )
        probe = f".prefixd-probe-{secrets.token_hex(4)}"
        self.write_bytes(probe, b"ok")
        try:
            if self.read_bytes(probe) != b"ok":
                raise StorageError(f"{self.setting}: {self.uri}: a probe file read back different bytes")
        finally:
            self.delete(probe)

    # ---- checkpoints ------------------------------------------------------------------------------

    def save_checkpoint(self, local_dir: str | os.PathLike, step: int) -> str:
        """Upload a local checkpoint folder whole under a new name, then its manifest; returns the name.

        Until the manifest exists the new checkpoint does not count: a crash before it leaves the previous
        one as the newest. Afterwards every checkpoint but the new one and the previous complete one is
        removed (including incomplete leftovers of crashed writes up to this step)."""
        local_dir = Path(local_dir)
        name = f"step-{step:09d}-{secrets.token_hex(4)}"
        files = {p.relative_to(local_dir).as_posix(): p for p in sorted(local_dir.rglob("*")) if p.is_file()}
        self.upload(local_dir, f"{CHECKPOINTS}/{name}")
        manifest = {
            "step": step,
            "written_at": time.time(),
            "files": {rel: {"size": p.stat().st_size, "sha256": _sha256(p)} for rel, p in files.items()},
        }
        self._write_manifest(f"{CHECKPOINTS}/{name}/{MANIFEST}", manifest)
        listing = self.listing(CHECKPOINTS)
        complete = _complete(listing)
        keep = {name, *complete[:2]}
        for other in sorted({rel.split("/", 1)[0] for rel in listing if "/" in rel} - keep):
            if other in complete or _step_of(other) <= step:
                self.delete(f"{CHECKPOINTS}/{other}")
        return name

    def _write_manifest(self, name: str, manifest: dict) -> None:
        """The commit point of a checkpoint (a separate method so a test can fail it)."""
        self.write_text(name, json.dumps(manifest, indent=1))

    def complete_checkpoints(self) -> list[str]:
        """Names of the checkpoints whose manifest exists, newest (highest step) first."""
        return _complete(self.listing(CHECKPOINTS))

    def download_checkpoint(self, name: str, local_dir: str | os.PathLike) -> dict:
        """Download a complete checkpoint and check every file against its manifest; returns the manifest.
        CheckpointError when a file is missing, cut short or changed."""
        local_dir = Path(local_dir)
        where = self.child(CHECKPOINTS, name).uri
        try:
            manifest = json.loads(self.read_text(f"{CHECKPOINTS}/{name}/{MANIFEST}"))
            files = manifest["files"]
        except (FileNotFoundError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{self.setting}: checkpoint {where}: no readable manifest ({e})") from None
        for rel, expected in files.items():
            dst = local_dir / rel
            try:
                self.download(f"{CHECKPOINTS}/{name}/{rel}", dst)
            except FileNotFoundError:
                raise CheckpointError(f"{self.setting}: checkpoint {where}: {rel} is missing") from None
            size = dst.stat().st_size
            if size != expected["size"] or _sha256(dst) != expected["sha256"]:
                why = f"{size} bytes, not {expected['size']}" if size != expected["size"] else "its sha256 differs"
                raise CheckpointError(f"{self.setting}: checkpoint {where}: {rel} does not match its manifest: {why}")
        return manifest

    def delete_checkpoints(self) -> None:
        self.delete(CHECKPOINTS)

    # ---- plumbing ---------------------------------------------------------------------------------

    def _fs(self, name: str) -> tuple[pafs.FileSystem, str]:
        fs, root = filesystem(self.uri, self.setting)
        return fs, f"{root}/{name}".rstrip("/") if name else root

    def _call(self, what: str, name: str, fn):
        try:
            return fn()
        except (FileNotFoundError, StorageError):
            raise
        except OSError as e:
            raise StorageError(
                describe_failure(self.setting, self.child(name).uri if name else self.uri, what, e)
            ) from None


def fetch(uri: str | os.PathLike, cache_dir: str | os.PathLike, setting: str = "data") -> Path:
    """A local copy of the file or folder `uri` names, kept in `cache_dir/remote/` and reused while the
    object's size and modification time stay the same; a local path is returned as it is."""
    text = str(uri)
    if not is_remote(text):
        return Path(JobStorage.open(text, setting).uri)
    source = JobStorage.open(text, setting)
    listing = source.listing()
    if not listing:
        raise FileNotFoundError(f"{source.uri}: no such file or folder")
    key = hashlib.sha256(json.dumps([source.uri, sorted(listing.items())]).encode()).hexdigest()[:20]
    base = urlsplit(source.uri).path.rstrip("/").rsplit("/", 1)[-1] or "data"
    final = Path(cache_dir) / "remote" / key
    if not final.is_dir():
        tmp = Path(cache_dir) / "remote" / f".{key}.{os.getpid()}-{secrets.token_hex(3)}"
        try:
            source.download("", tmp / base)
            try:
                os.replace(tmp, final)
            except OSError:  # another process finished the same copy first
                if not final.is_dir():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final / base


# ---- file plumbing ---------------------------------------------------------------------------------


def _read_all(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def _copy_limited(stream: BinaryIO, out: BinaryIO, max_bytes: int | None, target: JobStorage) -> None:
    written = 0
    while chunk := stream.read(_CHUNK):
        written += len(chunk)
        if max_bytes is not None and written > max_bytes:
            raise StorageError(f"{target.setting}: {target.uri}: more than {max_bytes} bytes; nothing stored")
        out.write(chunk)


def _local_put(path: Path, stream: BinaryIO, max_bytes: int | None, target: JobStorage) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as out:
            _copy_limited(stream, out, max_bytes, target)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return str(path)


def _copy_in(fs: pafs.FileSystem, path: str, src: Path, local: bool) -> None:
    if local:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(src, "rb") as f, open(path, "wb") as out:
            shutil.copyfileobj(f, out, _CHUNK)
            out.flush()
            os.fsync(out.fileno())
        return
    with open(src, "rb") as f, fs.open_output_stream(path) as out:
        while chunk := f.read(_CHUNK):
            out.write(chunk)


def _copy_out(fs: pafs.FileSystem, path: str, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with fs.open_input_stream(path) as f, open(dst, "wb") as out:
        while chunk := f.read(_CHUNK):
            out.write(chunk)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(top: Path, stop: Path) -> None:
    """fsync every folder under `top`, then `top` and its parents up to `stop` (their entries changed)."""
    if top.is_dir():
        for folder in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            _fsync_dir(folder)
    folder = top if top.is_dir() else top.parent
    while True:
        _fsync_dir(folder)
        if folder == stop or stop not in folder.parents:
            break
        folder = folder.parent


def _relative(path: str, root: str) -> str:
    return path[len(root) :].lstrip("/")


def _mtime(info: pafs.FileInfo) -> float:
    return info.mtime.timestamp() if info.mtime is not None else 0.0


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _complete(listing: dict[str, tuple[int, float]]) -> list[str]:
    """Checkpoint names in a listing of checkpoints/ that have their manifest, newest first."""
    done = [rel.split("/", 1)[0] for rel in listing if rel.count("/") == 1 and rel.endswith(f"/{MANIFEST}")]
    done = [n for n in done if _CHECKPOINT_RE.match(n)]
    return sorted(done, key=lambda n: (_step_of(n), listing[f"{n}/{MANIFEST}"][1]), reverse=True)


def _step_of(name: str) -> int:
    m = _CHECKPOINT_RE.match(name)
    return int(m.group(1)) if m else -1


def temporary_dir(parent: str | os.PathLike | None, prefix: str) -> tempfile.TemporaryDirectory:
    """A temporary folder under `parent` (created) or the system's temporary folder."""
    if parent is not None:
        Path(parent).mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=prefix, dir=parent)
