"""A finished job's folder in storage: its file names, how it is written, and how every reader reads it.

    <job folder>/                  a local path or a URI (`workers/storage.py`), the same on every attempt
        adapter/                   PEFT prefix-tuning adapter of the best evaluation's prefix (the registered one)
        prefix/                    prefixd's own folder of that prefix (prefix_config.json, prefix_encoder.safetensors)
        final/adapter, final/prefix   the same for the last step's prefix
        history.jsonl              one JSON record per step (step, time, loss, ..., eval metrics at eval steps)
        metrics.json               the best prefix on every validation row, {name: number}, with best_step,
                                   best_<metric> and final_<name> (the last prefix on every row)
        data_report.txt            what the data reader kept and dropped
        result.json                written last, by the worker group: the folder is complete

Writers: the trainer (`write_outputs`: everything but result.json, rank 0), then the worker group
(`write_result`). Readers: the group before training a job again (`completed_result`: an earlier attempt may
have finished it) and the registrar on whatever machine it runs (`load_result`: the files on this machine,
downloaded when the folder is remote, with history and metrics parsed).

    write_result("s3://bucket/prefixd/jobs/j-1", task_result)     # the group, after the last step
    completed_result("s3://bucket/prefixd/jobs/j-1", "j-1")       # result.json's fields, or None
    folder = load_result("s3://bucket/prefixd/jobs/j-1", "j-1")   # folder.adapter, .metrics, .history
"""

from __future__ import annotations

import json
import math
import numbers
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from workers.storage import JobStorage

ADAPTER = "adapter"
PREFIX = "prefix"
HISTORY = "history.jsonl"
METRICS = "metrics.json"
DATA_REPORT = "data_report.txt"
RESULT_FILE = "result.json"
FINAL = "final"  # the last step's adapter/ and prefix/, when the registered ones are the best evaluation's
TRAINER_OUTPUTS = (ADAPTER, PREFIX, FINAL, HISTORY, METRICS, DATA_REPORT)
"""What the trainer uploads; result.json follows."""
REQUIRED = (
    f"{ADAPTER}/adapter_config.json",
    f"{ADAPTER}/adapter_model.safetensors",
    f"{PREFIX}/prefix_config.json",
    f"{PREFIX}/prefix_encoder.safetensors",
    METRICS,
    HISTORY,
)
"""What the registrar needs of a result folder."""


class ResultError(ValueError):
    """A result folder that lacks something or cannot be read; names the job and the folder."""


def finite(value: Any) -> float | None:
    """`value` as a float when it is a finite real number (not a bool), else None: `finite(float("nan"))` is None."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def job_folder(jobs_dir: str, job_id: str) -> str:
    """The job's folder below the storage's jobs folder (a local path or a URI), the same on every attempt."""
    return JobStorage.open(jobs_dir).child(job_id).uri


# ---- writing ----------------------------------------------------------------------------------------------


def write_outputs(
    out: JobStorage,
    staged: Path,
    *,
    history: Iterable[Mapping[str, Any]],
    metrics: Mapping[str, float],
    report: str,
) -> None:
    """Upload the trainer's outputs to the job folder `out`: `staged` already holds adapter/ and prefix/;
    history, metrics and the data report are written beside them first."""
    with open(staged / HISTORY, "w", encoding="utf-8") as f:
        for record in history:
            f.write(json.dumps(record) + "\n")
    (staged / METRICS).write_text(json.dumps(dict(metrics), indent=2), encoding="utf-8")
    (staged / DATA_REPORT).write_text(report + "\n", encoding="utf-8")
    for name in TRAINER_OUTPUTS:
        out.upload(staged / name, name)


def write_result(job_dir: str | Path, result) -> str:
    """Write the TaskResult's fields as job_dir/result.json, whole or not at all; returns its URI."""
    data = asdict(result) | {"job_id": result.task_id, "finished_at": time.time()}
    return JobStorage.open(job_dir).write_text(RESULT_FILE, json.dumps(data, indent=2) + "\n")


# ---- reading ----------------------------------------------------------------------------------------------


def completed_result(job_dir: str | Path, job_id: str) -> dict | None:
    """The job's complete result.json, or None if there is none (or it is not this job's, or its adapter
    is missing). StorageError (an OSError) when the storage cannot be read: that is not "no result"."""
    folder = JobStorage.open(job_dir)
    try:
        data = json.loads(folder.read_text(RESULT_FILE))
    except (FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or data.get("job_id") != job_id:
        return None
    return data if folder.exists(f"{ADAPTER}/adapter_config.json") else None


@dataclass(frozen=True)
class ResultFolder:
    """A finished job's folder on this machine, its history and final metrics read."""

    root: Path
    """The folder's files on this machine (a temporary copy when the job's folder is in remote storage)."""
    history: list[dict[str, Any]]
    """history.jsonl, one record per step."""
    metrics: dict[str, float]
    """metrics.json: the final evaluation (finite numbers only)."""
    keep: Any = field(default=None, repr=False, compare=False)
    """The temporary copy's TemporaryDirectory: removed once this folder is no longer referenced."""

    @property
    def adapter(self) -> Path:
        return self.root / ADAPTER

    @property
    def prefix(self) -> Path:
        return self.root / PREFIX

    def files(self) -> list[Path]:
        """The folder's single files (metrics, history, data report, result.json) that are present."""
        return [
            self.root / name for name in (METRICS, HISTORY, DATA_REPORT, RESULT_FILE) if (self.root / name).is_file()
        ]


def load_result(result_dir: str | Path | None, job_id: str = "?") -> ResultFolder:
    """Check and read a job's result folder, a local path or a storage URI (fetched to this machine).
    ResultError names what is missing or unreadable; StorageError (also a ValueError) what failed to read."""
    if not result_dir:
        raise ResultError(f"job {job_id}: it has no result_dir")
    root, keep = fetch_result(result_dir, job_id)
    try:
        metrics = json.loads((root / METRICS).read_text(encoding="utf-8"))
        history = [
            json.loads(line) for line in (root / HISTORY).read_text(encoding="utf-8").splitlines() if line.strip()
        ]
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResultError(f"job {job_id}: {root}: {METRICS} or {HISTORY} is not valid JSON ({e})") from None
    if not isinstance(metrics, dict):
        raise ResultError(f"job {job_id}: {root / METRICS}: expected a JSON object")
    numbers = {k: f for k, v in metrics.items() if (f := finite(v)) is not None}
    return ResultFolder(root=root, history=history, metrics=numbers, keep=keep)


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
    for name in (*TRAINER_OUTPUTS, RESULT_FILE):
        if name in listing or any(rel.startswith(f"{name}/") for rel in listing):
            folder.download(name, root / name)
    return root, keep
