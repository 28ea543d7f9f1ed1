"""Recognising a task's data files: their format and column names, without reading their rows.

Shared by spec validation (which must refuse a spec whose data lacks the named columns at submit time)
and by the trainer's data loading (`workers/data.py`). Reading column names touches only a file's header
or schema: a Parquet footer, a CSV's first line, the first JSON line, a saved dataset's `dataset_info`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow.parquet as pq

FORMATS = ("jsonl", "csv", "parquet", "arrow")
_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


class DataFileError(ValueError):
    """A data file that cannot be used; the message names the file and what is wrong."""


def detect_format(path: str | Path, declared: str = "auto") -> str:
    """Return one of FORMATS for `path`: the declared one, or the one its suffix (or folder) implies."""
    path = Path(path)
    if declared != "auto":
        if declared not in FORMATS:
            raise DataFileError(f"format {declared!r} is not one of {', '.join(('auto',) + FORMATS)}")
        return declared
    if path.is_dir():
        return "arrow"
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise DataFileError(
            f"{path}: cannot tell the format from the suffix {path.suffix!r}; "
            f"use one of {', '.join(sorted(_SUFFIXES))}, a folder saved with datasets' save_to_disk, "
            f"or set data.format to one of {', '.join(FORMATS)}"
        )
    return fmt


def read_column_names(path: str | Path, fmt: str = "auto") -> list[str]:
    """Column names of a data file or saved dataset folder, read from its header only.

    Raises DataFileError naming the file when it is missing, empty, undecodable or of an unknown format.
    """
    path = Path(path)
    if not path.exists():
        raise DataFileError(f"{path}: no such file or folder")
    fmt = detect_format(path, fmt)
    try:
        if fmt == "parquet":
            return list(pq.read_schema(path).names)
        if fmt == "arrow":
            return _saved_dataset_columns(path)
        if path.stat().st_size == 0:
            raise DataFileError(f"{path}: the file is empty")
        with open(path, encoding="utf-8", newline="") as f:
            if fmt == "csv":
                header = next(csv.reader(f), None)
                if not header:
                    raise DataFileError(f"{path}: the CSV file has no header line")
                return header
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataFileError(f"{path}: line {lineno} is not valid JSON ({e.msg})") from None
                    if not isinstance(row, dict):
                        raise DataFileError(f"{path}: line {lineno} is a JSON {type(row).__name__}, not an object")
                    return list(row)
            raise DataFileError(f"{path}: the file has no rows")
    except UnicodeDecodeError as e:
        raise DataFileError(f"{path}: not UTF-8 text (undecodable byte at offset {e.start})") from None
    except DataFileError:
        raise
    except Exception as e:  # pyarrow raises its own types for corrupt files
        raise DataFileError(f"{path}: cannot read as {fmt}: {e}") from None


def _saved_dataset_columns(path: Path) -> list[str]:
    info = path / "dataset_info.json"
    if not info.is_file():
        splits = path / "dataset_dict.json"
        hint = " (it is a DatasetDict: point at one split's folder)" if splits.is_file() else ""
        raise DataFileError(f"{path}: not a folder saved with datasets' save_to_disk{hint}")
    features = json.loads(info.read_text(encoding="utf-8")).get("features") or {}
    return list(features)
