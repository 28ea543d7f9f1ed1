"""Data files -> memory-mapped Arrow datasets, with errors that name the file and the line.

    ds = read_rows("qa.jsonl", "auto", cache_dir=None, work_dir=Path("/tmp/cache/prefixd-tokenized"))

JSON lines, CSV, Parquet, or a folder saved with `save_to_disk`, read with `datasets`; a storage URI
(s3://bucket/key) is copied into the cache first (`workers.storage.fetch`).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import datasets
import pyarrow.parquet as pq

from jobs.datafiles import DataFileError, detect_format, read_column_names
from workers.storage import fetch, is_remote


class DataError(DataFileError):
    """Task data that cannot be used; the message names the file, and the row and column when it can."""


def read_rows(path: str, fmt: str, cache_dir: str | None, work_dir: Path) -> datasets.Dataset:
    """`_read` of a local path, or of the cached copy of a file or folder named by a storage URI
    (s3://...; `workers.storage.fetch`, kept beside the tokenized cache), with errors naming the URI."""
    if not is_remote(path):
        return _read(Path(path), fmt, cache_dir)
    try:
        local = fetch(path, work_dir.parent, setting="data")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file or folder") from None
    except OSError as e:  # StorageError: unreachable, refused; names the URI and the fix
        raise DataError(str(e)) from None
    try:
        return _read(local, fmt, cache_dir)
    except DataError as e:
        raise DataError(str(e).replace(str(local), path)) from None


def _read(path: Path, fmt: str, cache_dir: str | None) -> datasets.Dataset:
    """The file's rows as a memory-mapped Arrow dataset; DataError naming the file (and line) otherwise."""
    try:
        fmt = detect_format(path, fmt)
    except DataFileError as e:
        raise DataError(str(e)) from None
    try:
        names = read_column_names(path, fmt)  # missing, empty, undecodable header, not a saved dataset
    except DataFileError as e:
        # Its reader decodes a block at a time, so a bad byte further down can surface here: find its line.
        raise DataError((path.is_file() and _bad_line(path, fmt)) or str(e)) from None
    try:
        if fmt == "arrow":
            ds = datasets.load_from_disk(str(path))
        elif fmt == "csv":
            # Every column as text, and only an empty field is empty: pandas would otherwise read "NA",
            # "null" or "None" as missing and "007" as the number 7.
            features = datasets.Features({name: datasets.Value("string") for name in names})
            ds = datasets.load_dataset(
                "csv",
                data_files=str(path),
                split="train",
                cache_dir=cache_dir,
                features=features,
                keep_default_na=False,
            )
        else:
            builder = "json" if fmt == "jsonl" else "parquet"
            ds = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir)
    except Exception as e:
        raise DataError(_read_failure(path, fmt, e)) from e
    if not isinstance(ds, datasets.Dataset):
        raise DataError(f"{path}: holds several splits ({', '.join(ds)}): point at one split's folder")
    if len(ds) == 0:
        raise DataError(f"{path}: the file has no rows")
    return ds


def _read_failure(path: Path, fmt: str, error: Exception) -> str:
    """What went wrong reading a file, with the line where one can be found."""
    where = _bad_line(path, fmt)
    if where:
        return where
    if _has_no_rows(path, fmt):  # `datasets` refuses these with a message about splits
        return f"{path}: the file has no rows"
    cause = error
    while cause.__cause__ is not None:
        cause = cause.__cause__
    return f"{path}: cannot read as {fmt}: {type(cause).__name__}: {cause}"


def _bad_line(path: Path, fmt: str) -> str | None:
    """The first line of a text file that is not UTF-8 (or, for JSON lines, not a JSON object), in words.

    Only called once reading has failed: it scans the file line by line in Python.
    """
    if fmt not in ("jsonl", "csv"):
        return None
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return (
                    f"{path}: line {lineno}: not UTF-8 text "
                    f"(undecodable byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line)"
                )
            if fmt == "jsonl" and line.strip():
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as e:
                    return f"{path}: line {lineno} is not valid JSON ({e.msg})"
                if not isinstance(value, dict):
                    return f"{path}: line {lineno} is a JSON {type(value).__name__}, not an object"
    return None


def _has_no_rows(path: Path, fmt: str) -> bool:
    try:
        if fmt == "csv":
            with open(path, encoding="utf-8", newline="") as f:
                records = csv.reader(f)
                next(records, None)  # the header
                return next(records, None) is None
        if fmt == "parquet":
            return pq.ParquetFile(path).metadata.num_rows == 0
    except Exception:  # unreadable for another reason: let the caller report the original error
        pass
    return False
