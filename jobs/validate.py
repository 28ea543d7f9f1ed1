"""Checking a parsed spec document against the field table (jobs/fields.py), every problem at once.

    values = check_document(obj, base_dir=Path("specs"))                        # a local spec file
    values = check_document(obj, base_dir=root, data_root=root, bounds=bounds)  # a spec sent to the server

Returns the fields' values (defaults filled in, paths absolute) for `JobSpec`, or raises SpecError.

Paths, uploaded file ids, the base model's folder and the data files are checked in jobs/validate_data.py:
with a `data_root` (the HTTP API) no path leaves it and no message tells anything about the server's files.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any

from jobs.bounds import SpecBounds
from jobs.fields import (
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
from jobs.validate_data import check_base_model, check_data, check_path

_KEY_HINTS = {
    "trust_remote_code": "trust_remote_code is an operator setting, not part of a job spec "
    "(a spec never chooses to run code from a model repository)",
}
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
        context = check_base_model(c.get("base_model"), raw.get("base_model"), ctx.data_root, problems)
        check_data(c.get("data"), raw.get("data"), ctx.data_root, problems)
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
        return check_path(value, path, base_dir=ctx.base_dir, data_root=ctx.data_root, files=ctx.files, bad=bad)
    return value


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
