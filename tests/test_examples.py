"""The example tasks and `make demo`, checked without the real model: each task's held-out prompts are in
none of its data files (that the files are what make_data.py writes: tests/test_spec.py), and the demo asks
exactly those prompts, each with its own task, through `prefixd generate --pairs` (tested on a tiny model in
tests/test_pairs.py)."""

import json
import re
import runpy
import shlex
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from jobs.spec import load_spec
from orchestrator.cli import build_parser
from orchestrator.pairs import read_pairs

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "jobs" / "examples"


def _make_data() -> SimpleNamespace:
    return SimpleNamespace(**runpy.run_path(str(EXAMPLES / "make_data.py")))


def _demo_commands() -> list[list[str]]:
    dry = subprocess.run(["make", "-n", "demo", "STAMP="], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [shlex.split(line) for line in dry.replace("\\\n", " ").splitlines() if "prefixd --home" in line]


def _demo_specs():
    [submit] = [c for c in _demo_commands() if "submit" in c]
    return {spec.name: spec for spec in (load_spec(ROOT / p) for p in submit if p.endswith(".yaml"))}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_heldout_prompts_are_in_no_data_file_of_their_task():
    make_data = _make_data()
    specs = _demo_specs()
    pairs = read_pairs(EXAMPLES / "heldout.jsonl")
    assert [p.task for p in pairs] == [t for t in make_data.HELDOUT for _ in make_data.HELDOUT[t]]
    assert set(make_data.HELDOUT) == set(specs) and len(specs) == 4
    for name, spec in specs.items():
        assert spec.data.template == make_data.TEMPLATES[name]
        files = [spec.data.train] + ([spec.data.validation] if spec.data.validation else [])
        rows = [row for f in files for row in _rows(Path(f))]
        prompts = {spec.data.template.format_map(row): row[spec.data.target_column].strip() for row in rows}
        held = [p for p in pairs if p.task == name]
        assert len(held) >= 3 and len({p.prompt for p in held}) == len(held)
        for p in held:
            assert p.prompt not in prompts, f"{name}: held-out {p.prompt!r} is in its data"
            assert p.expected
        # the held-out rows are the template's prompts with the task's own answers, as in the data
        column, _, every_row = make_data.task_rows()[name]
        all_rows = {r[column]: r for r in every_row}
        for x, p in zip(make_data.HELDOUT[name], held):
            assert p.prompt == spec.data.template.format_map(all_rows[x])
            assert p.expected == all_rows[x][spec.data.target_column].strip()


def test_demo_asks_the_heldout_prompts_each_with_its_own_task_and_the_bare_model():
    commands = _demo_commands()
    [generate] = [c for c in commands if "generate" in c]
    args = build_parser().parse_args(generate[1:])
    assert (args.pairs, args.with_base, args.tasks, args.prompts) == ("jobs/examples/heldout.jsonl", True, [], [])
    assert set(_demo_specs()) == {p.task for p in read_pairs(EXAMPLES / "heldout.jsonl")}


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "no rows"),
        ("{oops\n", "line 1: not JSON"),
        ('{"task": "a", "prompt": "x"}\n[1]\n', "line 2: a JSON object with task, prompt, expected is expected"),
        ('{"task": "", "prompt": "x", "extra": 1}\n', "line 1: unknown field 'extra'; 'task' must be a non-empty"),
        ('{"task": "a", "prompt": "x", "expected": 3}\n', "line 1: 'expected' must be a string"),
    ],
)
def test_read_pairs_names_each_bad_line(tmp_path, text, message):
    from orchestrator.registry import RegistryError

    path = tmp_path / "pairs.jsonl"
    path.write_text(text)
    with pytest.raises(RegistryError, match=re.escape(message)):
        read_pairs(path)
