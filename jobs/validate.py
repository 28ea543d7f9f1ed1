"""Checking a parsed spec document against the field table (jobs/fields.py), every problem at once.

    values = check_document(obj, base_dir=Path("specs"))                        # a local spec file
    values = check_document(obj, base_dir=root, data_root=root, bounds=bounds)  # a spec sent to the server

Returns the fields' values (defaults filled in, paths absolute) for `JobSpec`, or raises SpecError.

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

import dataclasses
import difflib
import json
import math
import re
import string
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any

from jobs.bounds import SpecBounds
from jobs.builtin_models import BUILTIN_MODELS
from jobs.datafiles import DataFileError, data_exists, read_column_names
from jobs.fields import (
    CONTEXT_KEYS,
    GENERATION_METRICS,
    NAME_PATTERN,
    REGISTERED_NAME_PREFIX,
    RESERVED_TAG_PREFIX,
    JobSpec,
    _field_docs,
    _Rule,
    metric_direction,
)
from jobs.problems import Problem, SpecError
from workers.storage import is_remote

_KEY_HINTS = {
    "trust_remote_code": "trust_remote_code is an operator setting, not part of a job spec "
    "(a spec never chooses to run code from a model repository)",
}
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
_INVALID = object()


@dataclass(frozen=True)
class _Context:
    base_dir: Path
    data_root: Path | None
    bounds: SpecBounds
    files: Callable[[str], str | None] | None = None


def check_document(
    obj: Any,
    *,
    base_dir: Path,
    source: str = "<spec>",
    data_root: Path | None = None,
    bounds: SpecBounds | None = None,
    files: Callable[[str], str | None] | None = None,
) -> dict[str, Any]:
    """Validate a parsed spec (see the module docstring); returns the values JobSpec is built from."""
    problems: list[Problem] = []
    ctx = _Context(
        Path(base_dir).resolve(),
        None if data_root is None else Path(data_root).resolve(),
        bounds or SpecBounds(),
        files,
    )
    c = _check_section(JobSpec, obj, "", ctx, problems)
    if c is not None:
        raw = obj
        context = _check_base_model(c.get("base_model"), raw.get("base_model"), ctx, problems)
        _check_data(c.get("data"), raw.get("data"), ctx, problems)
        _check_context(c, context, problems)
        _check_training(c.get("training"), problems)
        _check_early_stopping(c, problems)
        _fill_registry(c, problems)
    if problems:
        raise SpecError(source, problems)
    return c


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _describe(value: Any) -> str:
    if value is None:
        return "null (an empty value)"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {_number(value)}"
    if isinstance(value, float):
        return f"number {value!r}"
    if isinstance(value, str):
        text = value if len(value) <= 60 else value[:57] + "..."
        return f"string {text!r}"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return type(value).__name__


def _number(value: float) -> str:
    """repr, with huge integers shortened: '1234...890 (40 digits)'."""
    text = repr(value)
    return text if len(text) <= 24 else f"{text[:10]}...{text[-3:]} ({len(text.lstrip('-'))} digits)"


def _expected(rule: _Rule) -> str:
    return {
        "bool": "true or false",
        "int": "an integer",
        "float": "a number",
        "str": "a string",
        "path": "a path (a string)",
        "section": "a mapping",
        "tags": "a mapping of strings to strings",
    }[rule.kind]


def _range_text(rule: _Rule) -> str:
    parts = []
    if rule.minimum is not None:
        parts.append(f">= {rule.minimum:g}")
    if rule.exclusive_minimum is not None:
        parts.append(f"> {rule.exclusive_minimum:g}")
    if rule.maximum is not None:
        parts.append(f"<= {rule.maximum:g}")
    if rule.exclusive_maximum is not None:
        parts.append(f"< {rule.exclusive_maximum:g}")
    return " and ".join(parts)


def _in_range(rule: _Rule, x: float) -> bool:
    return not (
        (rule.minimum is not None and x < rule.minimum)
        or (rule.exclusive_minimum is not None and x <= rule.exclusive_minimum)
        or (rule.maximum is not None and x > rule.maximum)
        or (rule.exclusive_maximum is not None and x >= rule.exclusive_maximum)
    )


def _first_sentence(text: str) -> str:
    return text.split(". ")[0].rstrip(".")


def _check_section(cls: type, raw: Any, path: str, ctx: _Context, problems: list[Problem]) -> dict | None:
    """Type-check one section against its field table. Returns its fields' values (defaults filled in,
    nested sections as dicts, derived defaults as None), leaving out fields that had a problem."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if not isinstance(raw, Mapping):
        where = "a job spec" if not path else "this section"
        problems.append(Problem(path, f"{where} must be a mapping with keys {', '.join(fields)}; got {_describe(raw)}"))
        return None
    for key in raw:
        if key not in fields:
            problems.append(Problem(_join(path, str(key)), _unknown_key(key, list(fields))))
    out: dict[str, Any] = {}
    for name, f in fields.items():
        rule: _Rule = f.metadata["rule"]
        p = _join(path, name)
        if name not in raw:
            if f.default is MISSING and f.default_factory is MISSING:
                doc = _field_docs(cls).get(name, "")
                problems.append(Problem(p, "missing (required)" + (f": {_first_sentence(doc)}" if doc else "")))
            elif rule.kind == "section" and not rule.nullable:
                out[name] = _check_section(rule.section, {}, p, ctx, problems)
            elif rule.kind == "tags":
                out[name] = {}
            else:
                out[name] = f.default
            continue
        value = _check_value(rule, raw[name], p, ctx, problems)
        if value is not _INVALID:
            out[name] = value
    for group in getattr(cls, "ONE_OF", ()):
        given = [k for k in group if raw.get(k) is not None]
        if len(given) != 1:
            options = " or ".join(f"'{k}'" for k in group) if len(group) == 2 else ", ".join(group)
            got = "neither" if not given and len(group) == 2 else ("none" if not given else " and ".join(given))
            problems.append(Problem(path, f"give exactly one of {options}; got {got}"))
    return out


def _unknown_key(key: Any, accepted: list[str]) -> str:
    if key in _KEY_HINTS:
        return f"unknown key: {_KEY_HINTS[key]}"
    close = difflib.get_close_matches(str(key), accepted, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown key{hint}; accepted keys here: {', '.join(accepted)}"


def _check_value(rule: _Rule, value: Any, path: str, ctx: _Context, problems: list[Problem]) -> Any:
    def bad(message: str) -> object:
        problems.append(Problem(path, message))
        return _INVALID

    if value is None:
        return None if rule.nullable else bad(f"expected {_expected(rule)}, got {_describe(value)}")
    kind = rule.kind
    if kind == "section":
        out = _check_section(rule.section, value, path, ctx, problems)
        return _INVALID if out is None else out
    if kind == "tags":
        return _check_tags(rule, value, path, problems)
    if kind == "bool":
        return value if isinstance(value, bool) else bad(f"expected true or false, got {_describe(value)}")
    if kind in ("int", "float"):
        wanted = int if kind == "int" else (int, float)
        if isinstance(value, bool) or not isinstance(value, wanted):
            return bad(f"expected {_expected(rule)}, got {_describe(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            return bad(f"expected a finite number, got {value!r}")
        if rule.maximum is not None:  # the operator's bound, else the field's default
            rule = dataclasses.replace(rule, maximum=ctx.bounds.maximum(path))
        if not _in_range(rule, value):
            return bad(f"must be {_range_text(rule)}, got {_number(value)}")
        return float(value) if kind == "float" else value
    # str and path
    if not isinstance(value, str):
        return bad(f"expected {_expected(rule)}, got {_describe(value)}")
    if rule.choices:
        if value not in rule.choices:
            return bad(f"{value!r} is not one of {', '.join(rule.choices)}")
        return value
    if not value.strip():
        return bad("must not be empty")
    if len(value) > rule.max_length:
        return bad(f"is {len(value)} characters long; at most {rule.max_length} are accepted")
    if rule.pattern and not re.fullmatch(rule.pattern, value):
        return bad(f"{value!r} does not match {rule.pattern} ({rule.pattern_help})")
    if kind == "path":
        if ctx.files is not None and path.startswith("data.") and re.fullmatch(r"file-[^./\\]*", value):
            if not re.fullmatch(FILE_ID_PATTERN, value):  # no suffix or folder: meant as an id, not a path
                return bad(
                    f"{value[:64]!r} is not a file id ('file-' and 32 lowercase hex digits, as POST /v1/files answers)"
                )
            found = ctx.files(value)
            if found is None:
                return bad(f"{value!r}: {UNKNOWN_FILE}")
            return found if is_remote(found) else Path(found)
        if is_remote(value):  # a storage URI (s3://...): data files only, read through workers/storage.py
            if not path.startswith("data."):
                return bad("a local folder is expected here, not a URI")
            return bad(STORAGE_URI_ON_SERVER) if ctx.data_root else value
        return _check_path(value, ctx, bad)
    return value


def _check_path(value: str, ctx: _Context, bad) -> Any:
    """The path made absolute (links followed); with a data root, refused unless it exists inside it.
    Nothing is opened here."""
    if any(ord(ch) < 32 for ch in value):
        return bad("a path may not hold control characters")
    try:
        resolved = (ctx.base_dir / value).resolve()
    except (OSError, ValueError, RuntimeError):  # a loop of links, a name too long
        return bad(OUTSIDE_DATA_ROOT if ctx.data_root else f"cannot resolve the path {value!r}")
    if ctx.data_root is None:
        return resolved
    if ctx.data_root not in resolved.parents or not resolved.exists():
        return bad(OUTSIDE_DATA_ROOT)
    return resolved


def _check_tags(rule: _Rule, value: Any, path: str, problems: list[Problem]) -> Any:
    if not isinstance(value, Mapping):
        problems.append(Problem(path, f"expected {_expected(rule)}, got {_describe(value)}"))
        return _INVALID
    if len(value) > rule.max_items:
        problems.append(Problem(path, f"has {len(value)} tags; at most {rule.max_items} are accepted"))
        return _INVALID
    ok = True
    for k, v in value.items():
        p = _join(path, str(k))
        if not isinstance(k, str) or not re.fullmatch(rule.pattern, k):
            problems.append(Problem(p, f"tag key {k!r} does not match {rule.pattern}"))
            ok = False
        elif k.lower().startswith(RESERVED_TAG_PREFIX):
            problems.append(
                Problem(
                    p,
                    f"tag key {k!r}: the '{RESERVED_TAG_PREFIX}' prefix is reserved for "
                    "prefixd's own registry tags; use another key",
                )
            )
            ok = False
        elif not isinstance(v, str):
            problems.append(Problem(p, f"tag values are strings; got {_describe(v)} (quote it)"))
            ok = False
        elif len(v) > rule.max_length:
            problems.append(Problem(p, f"tag value is {len(v)} characters long; at most {rule.max_length}"))
            ok = False
    return dict(value) if ok else _INVALID


def _shown(folder: Path, given: str, ctx: _Context) -> str:
    """How a path appears in messages: as given, plus the absolute path only when not on a server."""
    return f"{given!r}" if ctx.data_root else f"{given!r} (looked for {folder})"


def _check_base_model(bm: dict | None, raw: Any, ctx: _Context, problems: list[Problem]) -> tuple[int, str] | None:
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
        problems.append(Problem("base_model.path", f"{what} {_shown(folder, given, ctx)}"))
        return None
    config_path = folder / "config.json"
    if not config_path.is_file():
        problems.append(
            Problem(
                "base_model.path", f"folder {given!r} has no config.json (expected a model saved with save_pretrained)"
            )
        )
        return None
    shown = f"{given}/config.json" if ctx.data_root else str(config_path)
    try:
        with open(config_path, "rb") as fh:
            config = json.loads(fh.read(1 << 20).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        why = "" if ctx.data_root else f" ({e})"
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


def _check_data(d: dict | None, raw: Any, ctx: _Context, problems: list[Problem]) -> None:
    if d is None:
        return
    columns: dict[str, list[str]] = {}
    for key in ("train", "validation"):
        p: Path | None = d.get(key)
        if p is None:
            continue
        if not data_exists(p):
            problems.append(Problem(f"data.{key}", f"no such file {_shown(p, raw[key], ctx)}"))
        elif "format" in d:
            try:
                columns[key] = read_column_names(p, d["format"])
            except DataFileError as e:
                # On a server, the reason only: never the file's bytes or the server's own path.
                text = f"{raw[key]!r}: {e.reason}" if ctx.data_root else str(e)
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
                listed = "" if ctx.data_root else f" (its columns: {', '.join(cols)})"
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


def _check_context(c: dict, context: tuple[int, str] | None, problems: list[Problem]) -> None:
    if context is None:
        return
    limit, where = context
    n = (c.get("prefix") or {}).get("num_virtual_tokens")
    max_length = (c.get("data") or {}).get("max_length")
    if n is None:
        return
    if n >= limit:
        problems.append(
            Problem(
                "prefix.num_virtual_tokens",
                f"{n} virtual tokens do not fit the model's "
                f"context of {limit} tokens ({where}); use fewer than {limit}",
            )
        )
    elif max_length is not None and n + max_length > limit:
        problems.append(
            Problem(
                "data.max_length",
                f"{max_length} + prefix.num_virtual_tokens {n} = "
                f"{n + max_length} tokens exceeds the model's context of {limit} tokens "
                f"({where}); use data.max_length <= {limit - n}",
            )
        )


def _check_training(t: dict | None, problems: list[Problem]) -> None:
    if t and t.get("steps") is not None and t.get("warmup_steps") is not None and t["warmup_steps"] > t["steps"]:
        problems.append(
            Problem("training.warmup_steps", f"{t['warmup_steps']} warmup steps exceed training.steps {t['steps']}")
        )


def _check_early_stopping(c: dict, problems: list[Problem]) -> None:
    """Early stopping watches registry.metric: a generation metric is measured only with generation on."""
    t, reg = c.get("training") or {}, c.get("registry") or {}
    metric = reg.get("metric")
    if t.get("early_stopping") and metric in GENERATION_METRICS and not (t.get("eval_generation") or {}).get("enabled"):
        problems.append(
            Problem(
                "training.early_stopping",
                f"watches registry.metric {metric!r}, which is measured only with training.eval_generation.enabled "
                "true; enable it or choose eval_loss or eval_perplexity",
            )
        )


def _fill_registry(c: dict, problems: list[Problem]) -> None:
    """Choose the registry defaults that depend on other fields."""
    reg = c.get("registry")
    if reg is None:
        return
    if "model_name" in reg and reg["model_name"] is None and "name" in c:
        derived = REGISTERED_NAME_PREFIX + c["name"]
        if re.fullmatch(NAME_PATTERN, derived):
            reg["model_name"] = derived
        else:
            problems.append(
                Problem(
                    "registry.model_name",
                    f"the default {derived!r} is longer than 63 characters; set registry.model_name or shorten name",
                )
            )
    if "direction" in reg and reg["direction"] is None and "metric" in reg:
        reg["direction"] = metric_direction(reg["metric"])
