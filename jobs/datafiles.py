"""Recognising a task's data files: their format and column names, without reading their rows.

Shared by spec validation (which must refuse a spec whose data lacks the named columns at submit time)
and by the trainer's data loading (`workers/data.py`). Reading column names touches only a file's header
or schema: a Parquet footer, a CSV's first line, the first JSON line, a saved dataset's `dataset_info`.
A path may also be a storage URI (s3://bucket/data/train.jsonl; `workers/storage.py`): the same is read
through the storage layer, a header's bytes or a Parquet footer, never the whole file.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import TextIO
from urllib.parse import urlsplit

import pyarrow.parquet as pq

from workers.storage import is_remote

FORMATS = ("jsonl", "csv", "parquet", "arrow")
MAX_HEADER_CHARS = 1 << 20  # a header line (CSV) or first row (JSON lines) longer than this is refused
_MAX_BLANK_LINES = 1000
_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


class DataFileError(ValueError):
    """A data file that cannot be used; the message names the file and what is wrong.

    `.reason` says what is wrong without the file's path or any of its bytes (what a server may tell a
    user about a file): DataFileError("/srv/d/a.csv: the CSV file has no header line", reason="the CSV
    file has no header line").
    """

    def __init__(self, message: str, *, reason: str | None = None):
        super().__init__(message)
        self.reason = reason if reason is not None else message


def _error(path: Path, reason: str, detail: str = "") -> DataFileError:
    return DataFileError(f"{path}: {reason}{detail}", reason=reason)


def detect_format(path: str | Path, declared: str = "auto") -> str:
    """Return one of FORMATS for `path`: the declared one, or the one its suffix (or folder) implies."""
    if is_remote(path):
        path = Path(urlsplit(str(path)).path)  # the key's suffix (a folder is told by read_column_names)
    path = Path(path)
    if declared != "auto":
        if declared not in FORMATS:
            raise DataFileError(f"format {declared!r} is not one of {', '.join(('auto',) + FORMATS)}")
        return declared
    if path.is_dir():
        return "arrow"
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise _error(
            path,
            f"cannot tell the format from the suffix {path.suffix!r}; "
            f"use one of {', '.join(sorted(_SUFFIXES))}, a folder saved with datasets' save_to_disk, "
            f"or set data.format to one of {', '.join(FORMATS)}",
        )
    return fmt


def read_column_names(path: str | Path, fmt: str = "auto") -> list[str]:
    """Column names of a data file or saved dataset folder, read from its header only.

    Raises DataFileError naming the file when it is missing, empty, undecodable or of an unknown format.
    """
    if is_remote(path):
        return _remote_column_names(str(path), fmt)
    path = Path(path)
    if not path.exists():
        raise _error(path, "no such file or folder")
    fmt = detect_format(path, fmt)
    try:
        if fmt == "parquet":
            return list(pq.read_schema(path).names)
        if fmt == "arrow":
            return _saved_dataset_columns(path)
        if path.stat().st_size == 0:
            raise _error(path, "the file is empty")
        if not path.is_file():
            raise _error(path, f"is not a {fmt} file (a folder?)")
        with open(path, encoding="utf-8", newline="") as f:
            return _first_line_columns(f, path, fmt)
    except UnicodeDecodeError as e:
        raise _error(path, f"not UTF-8 text (undecodable byte at offset {e.start})") from None
    except DataFileError:
        raise
    except Exception as e:  # pyarrow raises its own types for corrupt files; csv its own for odd quoting
        raise _error(path, f"cannot read as {fmt}", f": {e}") from None


def _first_line_columns(f: TextIO, path: Path | str, fmt: str) -> list[str]:
    """The CSV header, or the keys of the first JSON line, of an open text file."""
    for lineno in range(1, _MAX_BLANK_LINES + 2):
        line = f.readline(MAX_HEADER_CHARS + 1)  # bounded: a file without newlines is not read whole
        if len(line) > MAX_HEADER_CHARS:
            raise _error(path, f"line {lineno} is longer than {MAX_HEADER_CHARS} characters")
        if not line:
            break
        if not line.strip():
            continue
        if fmt == "csv":
            header = next(csv.reader([line]), None)
            if not header:
                raise _error(path, "the CSV file has no header line")
            return header
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise _error(path, f"line {lineno} is not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise _error(path, f"line {lineno} is a JSON {type(row).__name__}, not an object")
        return list(row)
    raise _error(path, "the CSV file has no header line" if fmt == "csv" else "the file has no rows")


def data_exists(path: str | Path) -> bool:
    """Whether a data file or folder exists: a local path, or a storage URI (then False when it cannot be
    reached either; read_column_names says why)."""
    if not is_remote(path):
        return Path(path).exists()
    from workers.storage import JobStorage

    try:
        return JobStorage.open(path, "data").exists()
    except OSError:
        return False


def _remote_column_names(uri: str, fmt: str) -> list[str]:
    """read_column_names of a storage URI: the header's bytes, a Parquet footer or dataset_info.json only."""
    from workers.storage import JobStorage

    try:
        where = JobStorage.open(uri, "data")
        listing = where.listing()
        if not listing:
            raise _error(uri, "no such file or folder")
        is_file = "" in listing
        fmt = detect_format(uri, fmt) if is_file or fmt != "auto" else "arrow"
        if fmt == "arrow":
            if "dataset_info.json" not in listing:
                hint = " (it is a DatasetDict: point at one split's folder)" if "dataset_dict.json" in listing else ""
                raise _error(uri, f"not a folder saved with datasets' save_to_disk{hint}")
            return list(json.loads(where.read_text("dataset_info.json")).get("features") or {})
        if not is_file:
            raise _error(uri, f"is not a {fmt} file (a folder?)")
        if listing[""][0] == 0:
            raise _error(uri, "the file is empty")
        with where.open_input() as f:
            if fmt == "parquet":
                return list(pq.read_schema(f).names)
            return _first_line_columns(io.TextIOWrapper(f, encoding="utf-8", newline=""), uri, fmt)
    except UnicodeDecodeError as e:
        raise _error(uri, f"not UTF-8 text (undecodable byte at offset {e.start})") from None
    except DataFileError:
        raise
    except OSError as e:  # StorageError: unreachable, refused; it names the URI and the fix
        raise DataFileError(str(e), reason="cannot be read from its storage") from None
    except Exception as e:  # pyarrow raises its own types for corrupt files; csv its own for odd quoting
        raise _error(uri, f"cannot read as {fmt}", f": {e}") from None


def _saved_dataset_columns(path: Path) -> list[str]:
    info = path / "dataset_info.json"
    if not info.is_file():
        splits = path / "dataset_dict.json"
        hint = " (it is a DatasetDict: point at one split's folder)" if splits.is_file() else ""
        raise _error(path, f"not a folder saved with datasets' save_to_disk{hint}")
    features = json.loads(info.read_text(encoding="utf-8")).get("features") or {}
    return list(features)
