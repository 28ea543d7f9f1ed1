"""The one hardened reader for job-spec documents: spec files on disk and HTTP request bodies alike.

    obj = read_spec_file(Path("capitals.yaml"))                     # stat, size, then parse_document
    obj = parse_document(body_bytes, "request body", fmt="yaml")    # bytes already read (at most MAX_SPEC_BYTES)

Both return plain data (dicts, lists, str, int, float, bool, None) or raise SpecError with every problem:
- size: more than MAX_SPEC_BYTES bytes (the bytes actually read, not what a header or stat claims);
- bytes: NUL bytes, not UTF-8, empty (or only comments);
- YAML 1.2 core scalars: `1e-3` is a float, `yes`/`on` and `2024-01-01` are strings, `010` is ten,
  `0o17` and `0x1f` are octal and hex; integers longer than MAX_INT_DIGITS digits are refused;
- structure: duplicate keys, explicit tags (`!!python/...`, `!!int`, `!include`: every one), more than
  MAX_DEPTH levels of nesting, more than MAX_VALUES values as written and more than MAX_YAML_NODES once
  aliases are expanded (a "billion laughs" bomb), more than one document.
JSON gets the same limits (depth and value count are checked on the text, before it is parsed) and
refuses duplicate keys too. Nothing here touches any file but the one spec file it is given.
"""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path
from typing import Any

import yaml

from jobs.problems import Problem, SpecError

MAX_SPEC_BYTES = 1 << 20  # 1 MiB: a spec is a few hundred bytes; anything near this is a mistake or an attack
MAX_YAML_NODES = 10_000  # values after alias expansion; a full spec has ~80 (caps "billion laughs" bombs)
MAX_VALUES = 10_000  # values as written (keys included), before anything is built from them
MAX_DEPTH = 32  # nesting levels; a spec needs 4 (training.eval_generation.enabled)
MAX_INT_DIGITS = 64

_YAML = "tag:yaml.org,2002:"
_PLAIN_TAGS = {_YAML + t for t in ("str", "int", "float", "bool", "null", "map", "seq", "merge")}


def read_spec_file(path: Path, source: str | None = None) -> Any:
    """The file's single YAML (or, for a .json suffix, JSON) document as plain data; SpecError otherwise.

    Reads at most MAX_SPEC_BYTES + 1 bytes whatever the file's size says (it may grow while read).
    """
    source = str(path) if source is None else source

    def fail(message: str) -> None:
        raise SpecError(source, [Problem("", message)])

    try:
        st = path.stat()
    except FileNotFoundError:
        fail(f"no such file (looked for {path.resolve()})")
    except OSError as e:
        fail(f"cannot read the file: {e.strerror}")
    if stat.S_ISDIR(st.st_mode):
        fail("is a folder, not a job spec file")
    if not stat.S_ISREG(st.st_mode):
        fail("is not a regular file")
    if st.st_size > MAX_SPEC_BYTES:
        fail(_too_big())
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_SPEC_BYTES + 1)
    except OSError as e:
        fail(f"cannot read the file: {e.strerror}")
    return parse_document(data, source, fmt="json" if path.suffix.lower() == ".json" else "yaml")


def parse_document(data: bytes, source: str, *, fmt: str = "yaml") -> Any:
    """`data` (bytes as read, possibly one byte past the limit) as one YAML or JSON document.

    fmt: 'yaml' (YAML 1.2 core schema, which also reads JSON) or 'json'. Raises SpecError.
    """

    def fail(message: str) -> None:
        raise SpecError(source, [Problem("", message)])

    if len(data) > MAX_SPEC_BYTES:
        fail(_too_big())
    if b"\0" in data:
        fail("binary data (it holds NUL bytes), not a YAML or JSON text file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        fail(f"not UTF-8 text (undecodable byte at offset {e.start})")
    if not text.strip():
        fail("the file is empty")
    if fmt == "json":
        return _parse_json(text, source)
    return _parse_yaml(text, source)


def _too_big() -> str:
    return f"the file is over {MAX_SPEC_BYTES} bytes (1 MiB), the most a job spec may be"


# --- YAML -------------------------------------------------------------------------------------------------


class _Refused(Exception):
    """Stops composing at once: too deep or too many values (raised from inside the composer)."""


class _SpecLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema scalars, explicit tags marked, and nesting and value counts
    checked while composing (before a deep or huge document is built)."""

    yaml_implicit_resolvers: dict = {}

    def __init__(self, stream: str):
        super().__init__(stream)
        self.depth = 0
        self.values = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            return super().compose_node(parent, index)
        event = self.peek_event()
        self.depth += 1
        self.values += 1
        line = event.start_mark.line + 1
        if self.depth > MAX_DEPTH:
            raise _Refused(f"nested more than {MAX_DEPTH} levels deep (line {line}); a job spec needs 4")
        if self.values > MAX_VALUES:
            raise _Refused(f"more than {MAX_VALUES} values; a job spec needs far fewer")
        explicit = getattr(event, "tag", None) not in (None, "!")
        try:
            node = super().compose_node(parent, index)
        finally:
            self.depth -= 1
        if explicit:
            node.explicit_tag = True
        return node

    def construct_yaml_int(self, node):
        value = self.construct_scalar(node)
        digits = value.lstrip("+-")
        if len(digits) > MAX_INT_DIGITS:
            raise yaml.constructor.ConstructorError(
                None, None, f"an integer of {len(digits)} digits (at most {MAX_INT_DIGITS})", node.start_mark
            )
        sign = -1 if value.startswith("-") else 1
        if digits.startswith("0o"):
            return sign * int(digits[2:], 8)
        if digits.startswith("0x"):
            return sign * int(digits[2:], 16)
        return sign * int(digits, 10)


_SpecLoader.add_constructor(_YAML + "int", _SpecLoader.construct_yaml_int)
for _tag, _rx, _first in (
    ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    ("int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789"),
    (
        "float",
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)"
        r"|\.(?:nan|NaN|NAN))$",
        "-+0123456789.",
    ),
    ("merge", r"^(?:<<)$", "<"),
):
    _SpecLoader.add_implicit_resolver(_YAML + _tag, re.compile(_rx), list(_first))


def _parse_yaml(text: str, source: str) -> Any:
    def fail(message: str) -> None:
        raise SpecError(source, [Problem("", message)])

    loader = None
    try:
        loader = _SpecLoader(text)  # its reader already refuses control characters
        node = loader.get_single_node()
        if node is None:
            fail("the file is empty (only comments or blank lines)")
        problems = _check_yaml_nodes(node)
        if problems:
            raise SpecError(source, problems)
        return loader.construct_document(node)
    except _Refused as e:
        fail(f"not accepted: {e}")
    except yaml.MarkedYAMLError as e:
        where = e.problem_mark or e.context_mark
        at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        what = "; ".join(x for x in (e.context, e.problem) if x)
        fail(f"not valid YAML: {what}{at}")
    except yaml.YAMLError as e:
        fail(f"not valid YAML: {' '.join(str(e).split())}")
    except RecursionError:  # not reached with MAX_DEPTH this low; kept as the last line of defence
        fail("not accepted: the YAML is nested too deeply")
    finally:
        if loader is not None:
            loader.dispose()


def _check_yaml_nodes(root: yaml.Node) -> list[Problem]:
    """Before anything is constructed: refuse explicit and non-plain tags and duplicate keys, and cap the
    number of values with aliases expanded (an alias repeats its anchor's whole subtree, possibly
    recursively)."""
    problems = []
    stack: list[tuple[yaml.Node, str]] = [(root, "")]
    count = 0
    while stack:
        node, path = stack.pop()
        count += 1
        if count > MAX_YAML_NODES:
            return [
                Problem(
                    "", f"more than {MAX_YAML_NODES} values once YAML aliases are expanded; a job spec needs far fewer"
                )
            ]
        line = node.start_mark.line + 1
        if node.tag not in _PLAIN_TAGS or getattr(node, "explicit_tag", False):
            tag = node.tag.replace(_YAML, "!!")
            problems.append(
                Problem(
                    path,
                    f"YAML tag {tag!r} (line {line}) is not accepted: a job spec holds "
                    "only plain mappings, lists, strings, numbers and booleans",
                )
            )
            continue
        children: list[tuple[yaml.Node, str]] = []
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key, value in node.value:
                if key.tag == _YAML + "merge":
                    children.append((value, path))
                    continue
                name = key.value if isinstance(key, yaml.ScalarNode) else "<complex key>"
                if isinstance(key, yaml.ScalarNode):
                    if name in seen:
                        problems.append(
                            Problem(
                                _join(path, name), f"duplicate key (lines {seen[name]} and {key.start_mark.line + 1})"
                            )
                        )
                    seen[name] = key.start_mark.line + 1
                children += [(key, path), (value, _join(path, name))]
        elif isinstance(node, yaml.SequenceNode):
            children = [(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
        stack.extend(reversed(children))
    return problems


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# --- JSON -------------------------------------------------------------------------------------------------

# A JSON string (escapes included), or one structural character that opens a value or separates two.
_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{},]', re.S)


def _json_shape_problem(text: str) -> str | None:
    """Depth and value count read from the text alone, so a hostile body is refused before json.loads
    builds (or recurses into) anything."""
    depth = values = 0
    for m in _JSON_TOKEN.finditer(text):
        ch = m.group()
        if ch in "[{":
            depth += 1
            values += 1
            if depth > MAX_DEPTH:
                return f"nested more than {MAX_DEPTH} levels deep; a job spec needs 4"
        elif ch in "]}":
            depth -= 1
        elif ch == ",":
            values += 1
        if values > MAX_VALUES:
            return f"more than {MAX_VALUES} values; a job spec needs far fewer"
    return None


class _JsonObject(dict):
    duplicates: list[str]


def _json_object(pairs: list[tuple[str, Any]]) -> _JsonObject:
    obj = _JsonObject()
    obj.duplicates = []
    for k, v in pairs:
        if k in obj:
            obj.duplicates.append(k)
        obj[k] = v
    return obj


def _json_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text.lstrip('-'))} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _parse_json(text: str, source: str) -> Any:
    shape = _json_shape_problem(text)
    if shape:
        raise SpecError(source, [Problem("", f"not accepted: {shape}")])
    try:
        obj = json.loads(text, object_pairs_hook=_json_object, parse_int=_json_int)
    except json.JSONDecodeError as e:
        raise SpecError(source, [Problem("", f"not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})")]) from None
    except (ValueError, RecursionError) as e:
        raise SpecError(source, [Problem("", f"not accepted: {e}")]) from None
    problems = []
    stack: list[tuple[Any, str]] = [(obj, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, _JsonObject):
            problems += [Problem(_join(path, k), "duplicate key") for k in value.duplicates]
            stack += [(v, _join(path, k)) for k, v in value.items()]
        elif isinstance(value, list):
            stack += [(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if problems:
        raise SpecError(source, problems)
    return _plain(obj)


def _plain(value: Any) -> Any:
    """_JsonObject -> dict, recursively (depth is at most MAX_DEPTH here)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
