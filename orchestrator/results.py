"""A finished job's folder in storage, written and read in this one place.

The trainer uploads adapter/, prefix/, history.jsonl, metrics.json and data_report.txt to the job's folder
(`TaskConfig.out_dir`); the worker group then writes result.json, last: a folder is complete once its
result.json names the job and its adapter is there. Readers: the group, before training a job again
(`read_result`: an earlier attempt may have finished it), and the registrar, on whatever machine it runs
(`fetch_result`: the folder's files on this machine, downloaded when the folder is not local).

    write_result("s3://bucket/prefixd/jobs/j-1", task_result)      # the group, after the last step
    read_result("s3://bucket/prefixd/jobs/j-1", "j-1")             # result.json's fields, or None
    root, keep = fetch_result("s3://bucket/prefixd/jobs/j-1", "j-1")  # root/adapter/... on local disk
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from workers.storage import JobStorage

RESULT_FILE = "result.json"
REQUIRED = (
    "adapter/adapter_config.json",
    "adapter/adapter_model.safetensors",
    "prefix/prefix_config.json",
    "prefix/prefix_encoder.safetensors",
    "metrics.json",
    "history.jsonl",
)
"""What the registrar needs of a result folder."""
_FETCHED = ("adapter", "prefix", "metrics.json", "history.jsonl", "data_report.txt", RESULT_FILE)


class ResultError(ValueError):
    """A result folder that lacks something or cannot be read; names the job and the folder."""


def job_folder(jobs_dir: str, job_id: str) -> str:
    """The job's folder below the storage's jobs folder (a local path or a URI), the same on every attempt."""
    return JobStorage.open(jobs_dir).child(job_id).uri


def write_result(job_dir: str | Path, result) -> str:
    """Write the TaskResult's fields as job_dir/result.json, whole or not at all; returns its URI."""
    data = asdict(result) | {"job_id": result.task_id, "finished_at": time.time()}
    return JobStorage.open(job_dir).write_text(RESULT_FILE, json.dumps(data, indent=2) + "\n")


def read_result(job_dir: str | Path, job_id: str) -> dict | None:
    """The job's complete result.json, or None if there is none (or it is not this job's, or its adapter
    is missing). StorageError (an OSError) when the storage cannot be read: that is not "no result"."""
    folder = JobStorage.open(job_dir)
    try:
        data = json.loads(folder.read_text(RESULT_FILE))
    except (FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or data.get("job_id") != job_id:
        return None
    return data if folder.exists("adapter/adapter_config.json") else None


def fetch_result(result_dir: str | Path, job_id: str) -> tuple[Path, tempfile.TemporaryDirectory | None]:
    """The result folder's files on this machine: (root, None) for a local folder, else (a temporary copy,
    its TemporaryDirectory, which removes the copy when it is cleaned up or collected). ResultError names
    every missing file; storage errors pass as StorageError."""
    folder = JobStorage.open(result_dir, "result_dir")
    listing = folder.listing()
    missing = [name for name in REQUIRED if name not in listing]
    if missing:
        raise ResultError(f"job {job_id}: result folder {folder} lacks {', '.join(missing)}")
    if folder.is_local:
        return Path(folder.uri), None
    keep = tempfile.TemporaryDirectory(prefix=f"prefixd-result-{job_id}-")
    root = Path(keep.name)
    for name in _FETCHED:
        if name in listing or any(rel.startswith(f"{name}/") for rel in listing):
            folder.download(name, root / name)
    return root, keep
