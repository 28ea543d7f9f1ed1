"""The job spec's JSON Schema (draft 2020-12), generated from the field table (jobs/fields.py).

    schema = spec_json_schema()          # also in jobs/schema.json: `python -m jobs.spec > jobs/schema.json`

It checks types, ranges (the default bounds), choices, unknown keys, reserved tag keys and the
exactly-one-of groups; files, columns, the model's context and the operator's own bounds are beyond it
(jobs.validate checks them).
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING
from typing import Any

from jobs.fields import RESERVED_TAG_PREFIX, JobSpec, _field_docs, _Rule


def spec_json_schema() -> dict[str, Any]:
    """JSON Schema of a job spec file, generated from the same field table as the validator."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "prefixd job spec",
        **_section_schema(JobSpec),
    }


def _section_schema(cls: type) -> dict[str, Any]:
    docs = _field_docs(cls)
    properties: dict[str, Any] = {}
    required = []
    for f in dataclasses.fields(cls):
        rule: _Rule = f.metadata["rule"]
        s = _value_schema(rule)
        description = docs.get(f.name, "")
        if rule.derived:
            description += f" Default: {rule.derived}."
        if description:
            s = {"description": description.strip(), **s}
        if f.default is MISSING and f.default_factory is MISSING:
            required.append(f.name)
        elif not rule.derived and f.default is not MISSING:
            s["default"] = f.default
        elif rule.kind == "tags":
            s["default"] = {}
        properties[f.name] = s
    out: dict[str, Any] = {"type": "object"}
    if cls.__doc__:
        out["description"] = " ".join(cls.__doc__.split())
    out["properties"] = properties
    out["additionalProperties"] = False
    if required:
        out["required"] = required
    groups = getattr(cls, "ONE_OF", ())
    if groups:
        # exactly one key of each group present and not null
        out["allOf"] = [
            {"oneOf": [{"required": [k], "properties": {k: {"not": {"type": "null"}}}} for k in group]}
            for group in groups
        ]
    return out


def _value_schema(rule: _Rule) -> dict[str, Any]:
    kind = rule.kind
    if kind == "section":
        s = _section_schema(rule.section)
        return {"anyOf": [s, {"type": "null"}]} if rule.nullable else s
    if kind == "tags":
        return {
            "type": "object",
            "maxProperties": rule.max_items,
            "propertyNames": {"pattern": rule.pattern, "not": {"pattern": _reserved_pattern()}},
            "additionalProperties": {"type": "string", "maxLength": rule.max_length},
        }
    s: dict[str, Any] = {"type": {"bool": "boolean", "int": "integer", "float": "number"}.get(kind, "string")}
    if kind in ("str", "path"):
        if rule.choices:
            s["enum"] = list(rule.choices) + ([None] if rule.nullable else [])
        else:
            s["minLength"] = 1
            s["maxLength"] = rule.max_length
            if rule.pattern:
                s["pattern"] = rule.pattern
    for key, bound in (
        ("minimum", rule.minimum),
        ("maximum", rule.maximum),
        ("exclusiveMinimum", rule.exclusive_minimum),
        ("exclusiveMaximum", rule.exclusive_maximum),
    ):
        if bound is not None:
            s[key] = bound
    if rule.nullable:
        s["type"] = [s["type"], "null"]
    return s


def _reserved_pattern() -> str:
    """'^[pP][rR]...\\.': tag keys starting with the reserved prefix, any case (ECMA-262 has no (?i))."""
    return "^" + "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else "\\" + c for c in RESERVED_TAG_PREFIX)
