"""`prefixd generate --pairs FILE`: each prompt with its own task's prefix, all rows in one mixed-prefix
batch, each output marked right or wrong against the row's expected answer.

FILE holds JSON lines, one row per prompt: {"task": "capitals", "prompt": "Peru ->", "expected": "Lima"}
("expected" is optional). An output is right when it equals the expected answer after stripping and
collapsing whitespace (`workers.metrics.exact_match`). With with_base every prompt also runs on the bare
base model, in a second batch, and is marked the same way.

    rows = read_pairs("heldout.jsonl")
    results = generate_pairs(tracking_uri, rows, with_base=True)   # printed by `prefixd generate --pairs`
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.generation import load_prefixes_for_generation
from orchestrator.registry import RegistryError

FIELDS = ("task", "prompt", "expected")


@dataclass(frozen=True, kw_only=True)
class Pair:
    """One prompt for one task's prefix, with the answer it should give (None: unscored)."""

    task: str
    prompt: str
    expected: str | None = None


def read_pairs(path: str | Path) -> list[Pair]:
    """The rows of a JSON-lines pairs file; RegistryError naming every bad line (blank lines are skipped)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise RegistryError(f"--pairs {path}: cannot read it: {e}") from None
    pairs, problems = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"line {n}: not JSON ({e.msg})")
            continue
        if not isinstance(row, dict):
            problems.append(f"line {n}: a JSON object with {', '.join(FIELDS)} is expected, got {type(row).__name__}")
            continue
        bad = [f"unknown field {k!r}" for k in row if k not in FIELDS]
        bad += [f"{k!r} must be a non-empty string" for k in ("task", "prompt") if not _text(row.get(k))]
        if "expected" in row and not isinstance(row["expected"], str):
            bad.append("'expected' must be a string")
        if bad:
            problems.append(f"line {n}: " + "; ".join(bad) + f" (fields: {', '.join(FIELDS)})")
            continue
        pairs.append(Pair(**row))
    if problems:
        raise RegistryError(f"--pairs {path}: " + "; ".join(problems))
    if not pairs:
        raise RegistryError(f"--pairs {path}: no rows; each line is {{'task': ..., 'prompt': ..., 'expected': ...}}")
    return pairs


def generate_pairs(
    tracking_uri: str,
    pairs: Sequence[Pair],
    *,
    alias: str | None = None,
    version: str | int | None = None,
    max_new_tokens: int = 32,
    with_base: bool = False,
    device: str = "auto",
) -> list[dict[str, Any]]:
    """One result per pair, in the file's order: {task, name, version, prompt, expected, output, right}, plus
    base_output and base_right with with_base (right: None when the pair has no expected answer)."""
    from workers.generate import generate_texts

    tasks = list(dict.fromkeys(p.task for p in pairs))  # each task's prefix loaded once, first-seen order
    gs = load_prefixes_for_generation(tracking_uri, tasks, alias, version, device)
    prompts = [p.prompt for p in pairs]
    owners = [tasks.index(p.task) for p in pairs]
    outputs = generate_texts(
        gs.prefixed, gs.tokenizer, gs.prefixes, owners, prompts, max_new_tokens=max_new_tokens, batch_size=len(pairs)
    )
    results = []
    for p, j, out in zip(pairs, owners, outputs):
        v = gs.versions[j]
        results.append(
            {"task": p.task, "name": v["name"], "version": v["version"], "prompt": p.prompt, "expected": p.expected}
            | {"output": out, "right": _right(out, p.expected)}
        )
    if with_base:
        bare = generate_texts(
            gs.prefixed, gs.tokenizer, None, None, prompts, max_new_tokens=max_new_tokens, batch_size=len(pairs)
        )
        for r, out in zip(results, bare):
            r.update(base_output=out, base_right=_right(out, r["expected"]))
    return results


def _right(output: str, expected: str | None) -> bool | None:
    from workers.metrics import exact_match

    return None if expected is None else exact_match([output], [expected]) == 1.0


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())
