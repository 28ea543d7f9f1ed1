"""jobs/examples/reference.yaml documents every field of a job spec: it validates, and it names each field the
schema has (active, or commented out as an alternative), so adding a field without documenting it fails here."""

import json
import re
from pathlib import Path

import jsonschema
import yaml

from jobs.spec import load_spec, spec_json_schema

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "jobs" / "examples" / "reference.yaml"
# a key line, active or commented out: "  dtype: ...", "  # path: ...", "  #   id: ..." (nested under "# hub:")
KEY_LINE = re.compile(r"^(?P<indent> *)(?:#(?P<pad> +))?(?P<key>[a-z_]+):(?: |$)")


def schema_fields(node: dict, prefix: str = "") -> tuple[set[str], set[str]]:
    """(every field's dotted path, the paths that are sections) of a JSON Schema object node."""
    fields, sections = set(), set()
    for name, prop in node["properties"].items():
        path = prefix + name
        fields.add(path)
        inner = next((o for o in prop.get("anyOf", [prop]) if "properties" in o), None)
        if inner is not None:
            sections.add(path)
            sub_fields, sub_sections = schema_fields(inner, path + ".")
            fields |= sub_fields
            sections |= sub_sections
    return fields, sections


def named_fields(text: str) -> set[str]:
    """Dotted paths of the keys a YAML text names, commented-out ones included ('# key:' at the key's
    indentation, nested ones as '#   key:'). Comment lines that are not keys ('# Run: ...') do not match."""
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing keys
    paths = set()
    for line in text.splitlines():
        m = KEY_LINE.match(line)
        if not m:
            continue
        indent = len(m["indent"]) + (len(m["pad"]) - 1 if m["pad"] else 0)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, m["key"]))
        paths.add(".".join(key for _, key in stack))
    return paths


def test_reference_validates_with_the_spec_validator_and_the_schema():
    spec = load_spec(REFERENCE)  # the data files it names exist beside it, with the columns it names
    assert spec.data.train.is_file() and spec.data.validation is not None and spec.data.validation.is_file()
    jsonschema.validate(yaml.safe_load(REFERENCE.read_text()), spec_json_schema())


def test_reference_names_every_field_of_the_schema():
    schema = json.loads((ROOT / "jobs" / "schema.json").read_text())
    assert schema == spec_json_schema()  # the file on disk is the field table's
    fields, sections = schema_fields(schema)
    named = named_fields(REFERENCE.read_text())
    # keys under a free-form mapping (tags) are values, not fields
    documented = {p for p in named if "." not in p or p.rsplit(".", 1)[0] in sections}
    assert sorted(fields - documented) == [], "fields missing from jobs/examples/reference.yaml"
    assert sorted(documented - fields) == [], "keys in jobs/examples/reference.yaml the schema does not have"


def test_reference_gives_each_knob_a_comment():
    for line in REFERENCE.read_text().splitlines():
        m = KEY_LINE.match(line)
        if m and not m["pad"]:  # an active key
            assert " # " in line.split(":", 1)[1], f"no comment: {line!r}"


def test_named_fields_reads_nesting_and_commented_keys():
    text = "a:\n  b: 1  # b: not a key\n  # c: 2\n  # d:\n  #   e: 3\n  f: 4\n# Run: x\ng: 5\n"
    assert named_fields(text) == {"a", "a.b", "a.c", "a.d", "a.d.e", "a.f", "g"}
