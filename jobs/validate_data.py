"""The checks of a job spec that look at files (jobs/validate.py runs them): paths made absolute and kept
inside a server's data root, uploaded file ids, the base model's folder and its context length, the data
files and the columns a spec names.

    check_path("rev.jsonl", "data.train", base_dir=Path("specs"), data_root=None, files=None, bad=refuse)
    check_data(values["data"], raw["data"], data_root, problems)

With a `data_root` (the HTTP API) every path is resolved, links followed, and checked to lie inside it
before any file is opened; a path outside it, a link out of it, and a path that does not exist all get
one and the same answer, and no message quotes a file's bytes (no column lists, no parser output) or an
absolute path: a user learns nothing about the server's other files, not even whether they exist.
Without one (`prefixd validate`, `prefixd submit` on this machine) messages are as helpful as they can be.

With `files` (the HTTP API), data.train / data.validation may name an uploaded file by id ('file-' and 32
hex digits, FILE_ID_PATTERN): `files(id)` gives its storage path or URI (the data-root rule does not apply:
the server put it there), or None for an id the caller has no upload of, refused naming the field.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jobs.builtin_models import BUILTIN_MODELS
from jobs.datafiles import DataFileError, data_exists, read_column_names
from jobs.fields import CONTEXT_KEYS
from jobs.problems import Problem
from workers.storage import is_remote

OUTSIDE_DATA_ROOT = (
    "no file or folder of that name under the server's data root (paths are relative to it; "
    "'..', absolute paths elsewhere and links out of it are not followed)"
)
STORAGE_URI_ON_SERVER = (
    "a storage URI is not accepted in a spec sent to the server (it would read it with its "
    "own credentials); name a file under its data root"
)
FILE_ID_PATTERN = r"^file-[0-9a-f]{32}$"
UNKNOWN_FILE = (
    "no uploaded file with that id (unknown, deleted, or not yours); upload one with POST /v1/files "
    "(`prefixd --server URL submit` uploads a spec's local files) or name a path under the data root"
)


def check_path(
    value: str,
    field: str,
    *,
    base_dir: Path,
    data_root: Path | None,
    files: Callable[[str], str | None] | None,
    bad: Callable[[str], Any],
) -> Any:
    """A path field's value (a non-empty string): an uploaded file's storage path or URI for a `file-...` id
    under data. (when `files` is given), a storage URI as is (data files, not on a server), else the path
    made absolute (links followed), refused unless it exists inside `data_root` when one is given. A
    refusal is `bad(message)`, returned. Nothing is opened here."""
    if files is not None and field.startswith("data.") and re.fullmatch(r"file-[^./\\]*", value):
        if not re.fullmatch(FILE_ID_PATTERN, value):  # no suffix or folder: meant as an id, not a path
            return bad(
                f"{value[:64]!r} is not a file id ('file-' and 32 lowercase hex digits, as POST /v1/files answers)"
            )
        found = files(value)
        if found is None:
            return bad(f"{value!r}: {UNKNOWN_FILE}")
        return found if is_remote(found) else Path(found)
    if is_remote(value):  # a storage URI (s3://...): data files only, read through workers/storage.py
        if not field.startswith("data."):
            return bad("a local folder is expected here, not a URI")
        return bad(STORAGE_URI_ON_SERVER) if data_root else value
    if any(ord(ch) < 32 for ch in value):
        return bad("a path may not hold control characters")
    try:
        resolved = (base_dir / value).resolve()
    except (OSError, ValueError, RuntimeError):  # a loop of links, a name too long
        return bad(OUTSIDE_DATA_ROOT if data_root else f"cannot resolve the path {value!r}")
    if data_root is None:
        return resolved
    if data_root not in resolved.parents or not resolved.exists():
        return bad(OUTSIDE_DATA_ROOT)
    return resolved


def _shown(folder: Path, given: str, data_root: Path | None) -> str:
    """How a path appears in messages: as given, plus the absolute path only when not on a server."""
    return f"{given!r}" if data_root else f"{given!r} (looked for {folder})"


def check_base_model(
    bm: dict | None, raw: Any, data_root: Path | None, problems: list[Problem]
) -> tuple[int, str] | None:
    """Check a local model folder; return the model's context (tokens, where it came from) when known."""
    if not bm or sum(bm.get(k) is not None for k in ("builtin", "path", "hub")) != 1:
        return None
    if bm.get("builtin") is not None:
        return BUILTIN_MODELS[bm["builtin"]].context_length, f"built-in model {bm['builtin']!r}"
    folder: Path | None = bm.get("path")
    if folder is None:
        return None  # hub: checked by the worker that downloads it
    given = raw["path"]
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "no such folder"
        problems.append(Problem("base_model.path", f"{what} {_shown(folder, given, data_root)}"))
        return None
    config_path = folder / "config.json"
    if not config_path.is_file():
        problems.append(
            Problem(
                "base_model.path", f"folder {given!r} has no config.json (expected a model saved with save_pretrained)"
            )
        )
        return None
    shown = f"{given}/config.json" if data_root else str(config_path)
    try:
        with open(config_path, "rb") as fh:
            config = json.loads(fh.read(1 << 20).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        why = "" if data_root else f" ({e})"
        problems.append(Problem("base_model.path", f"{shown}: not a readable JSON file{why}"))
        return None
    if not isinstance(config, dict):
        problems.append(Problem("base_model.path", f"{shown}: not a JSON object"))
        return None
    for key in CONTEXT_KEYS:
        n = config.get(key)
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n, f"{key} in {given}/config.json"
    return None  # e.g. T5: relative positions, no fixed limit


def check_data(d: dict | None, raw: Any, data_root: Path | None, problems: list[Problem]) -> None:
    """data.train / data.validation exist, and every column the spec names is in each (read from the files'
    first rows or schema, jobs/datafiles.py)."""
    if d is None:
        return
    columns: dict[str, list[str]] = {}
    for key in ("train", "validation"):
        p: Path | None = d.get(key)
        if p is None:
            continue
        if not data_exists(p):
            problems.append(Problem(f"data.{key}", f"no such file {_shown(p, raw[key], data_root)}"))
        elif "format" in d:
            try:
                columns[key] = read_column_names(p, d["format"])
            except DataFileError as e:
                # On a server, the reason only: never the file's bytes or the server's own path.
                text = f"{raw[key]!r}: {e.reason}" if data_root else str(e)
                problems.append(Problem(f"data.{key}", text))

    named: list[tuple[str, str]] = []  # (field path, column)
    if d.get("input_column") is not None:
        named.append(("data.input_column", d["input_column"]))
    if d.get("template") is not None:
        names = _template_fields(d["template"], problems)
        named += [("data.template", n) for n in names]
        if d.get("target_column") in names:
            problems.append(
                Problem(
                    "data.template",
                    f"names the target column {d['target_column']!r}: the prompt would contain the answer",
                )
            )
    if d.get("target_column") is not None:
        if d["target_column"] == d.get("input_column"):
            problems.append(Problem("data.target_column", "must differ from data.input_column"))
        named.append(("data.target_column", d["target_column"]))
    for path, column in named:
        for key, cols in columns.items():
            if column not in cols:
                listed = "" if data_root else f" (its columns: {', '.join(cols)})"
                problems.append(Problem(path, f"column {column!r} is not in data.{key} {raw[key]!r}{listed}"))


def _template_fields(template: str, problems: list[Problem]) -> list[str]:
    """The column names a template reads; only plain {column} placeholders are accepted (no attribute or
    index access, no conversions or format specs: the template is data, never code)."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        problems.append(Problem("data.template", f"{e} (write a literal brace as '{{{{' or '}}}}')"))
        return []
    names: list[str] = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name == "" or name.isdigit() or "." in name or "[" in name or spec or conversion:
            shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            problems.append(
                Problem("data.template", f"placeholder {shown} must be a plain column name, like {{question}}")
            )
        elif name not in names:
            names.append(name)
    if not names and not any(p.path == "data.template" for p in problems):
        problems.append(
            Problem(
                "data.template",
                "has no {column} placeholder; for a prompt that is a column as is, use data.input_column",
            )
        )
    return names
