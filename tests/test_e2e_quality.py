"""benchmarks/e2e_quality.py's data handling and benchmarks/plots.py, without SmolLM2 or any training.

The E2E benchmark itself trains SmolLM2-135M for ~30 minutes: it is run by hand (see its docstring).
Here: parsing `input||reference` lines, grouping all references of an input (multi-reference BLEU),
the fixed evaluation sample, the synthetic co-tenants, and the plots script run as a real process on
small synthetic inputs in the formats e2e_quality.py and multitask.py write.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import e2e_quality  # noqa: E402
import plots  # noqa: E402

LINES = [
    "name : Blue Spice | Type : coffee shop | area : city centre||A coffee shop in the city centre area called Blue Spice . ",
    "name : Blue Spice | Type : coffee shop | area : city centre||Blue Spice is a coffee shop in city centre . ",
    "",
    "name : Blue Spice | Type : coffee shop | area : riverside||There is a coffee shop Blue Spice in the riverside area . ",
    "name : Blue Spice | Type : coffee shop | area : city centre||The Blue Spice coffee shop is in the city centre .",
]
CENTRE = "name : Blue Spice | Type : coffee shop | area : city centre"
RIVER = "name : Blue Spice | Type : coffee shop | area : riverside"


def write_lines(tmp_path, lines, name="e2e.txt"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_parse_and_group_references_by_input(tmp_path):
    pairs = e2e_quality.parse_e2e(write_lines(tmp_path, LINES))
    assert len(pairs) == 4  # the blank line is skipped
    assert pairs[0] == (CENTRE, "A coffee shop in the city centre area called Blue Spice .")  # stripped
    groups = e2e_quality.group_by_input(pairs)
    assert list(groups) == [CENTRE, RIVER]  # order of first appearance
    assert groups[CENTRE] == [
        "A coffee shop in the city centre area called Blue Spice .",
        "Blue Spice is a coffee shop in city centre .",
        "The Blue Spice coffee shop is in the city centre .",
    ]  # not adjacent, still grouped
    assert groups[RIVER] == ["There is a coffee shop Blue Spice in the riverside area ."]


@pytest.mark.parametrize("bad", ["no separator here", "a||b||c", "||only a reference", "only an input||  "])
def test_parse_rejects_malformed_lines_naming_the_line(tmp_path, bad):
    path = write_lines(tmp_path, LINES[:2] + [bad])
    with pytest.raises(ValueError, match=r"e2e\.txt: line 3: expected 'input\|\|reference'"):
        e2e_quality.parse_e2e(path)


def test_jsonl_targets_start_with_a_space_and_multi_reference_bleu(tmp_path):
    pairs = e2e_quality.parse_e2e(write_lines(tmp_path, LINES))
    path = e2e_quality.write_jsonl(pairs, tmp_path / "out" / "train.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[1] == {"table": CENTRE, "text": " Blue Spice is a coffee shop in city centre ."}
    assert e2e_quality.TEMPLATE.format(table=rows[1]["table"]) + rows[1]["text"] == (
        f"Table: {CENTRE}\nText: Blue Spice is a coffee shop in city centre ."
    )
    # A prediction equal to the input's second reference scores 100 against the group, not against the first
    groups = e2e_quality.group_by_input(pairs)
    pred = ["Blue Spice is a coffee shop in city centre ."]
    assert e2e_quality.score(pred, [groups[CENTRE]])["bleu"] == pytest.approx(100.0)
    assert e2e_quality.score(pred, [groups[CENTRE][:1]])["bleu"] < 50.0


def test_eval_sample_is_fixed_and_distinct():
    groups = {f"name : R{i} | area : riverside": [f"R{i} ."] for i in range(50)}
    first = e2e_quality.sample_inputs(groups, 10)
    assert first == e2e_quality.sample_inputs(dict(reversed(list(groups.items()))), 10)  # not file order
    assert len(set(first)) == 10
    assert sorted(e2e_quality.sample_inputs(groups, 500)) == sorted(groups)


def test_prompts_and_cotenants(tmp_path):
    prompt = e2e_quality.few_shot_prompt([("name : A", "A is here ."), ("name : B", "B is there .")], "name : C")
    assert (
        prompt == "Table: name : A\nText: A is here .\n\nTable: name : B\nText: B is there .\n\nTable: name : C\nText:"
    )
    assert e2e_quality.first_line(" A pub .\nTable: x") == "A pub ."
    assert [e2e_quality.number_words(n) for n in (0, 13, 40, 342, 900)] == [
        "zero",
        "thirteen",
        "forty",
        "three hundred forty two",
        "nine hundred",
    ]
    train, val = e2e_quality.write_cotenant("reverse", tmp_path, rows=5)
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    assert len(rows) == 5 and len(val.read_text().splitlines()) == e2e_quality.VALIDATION_ROWS
    assert all(r["target"] == " " + " ".join(reversed(r["input"].split())) for r in rows)


def test_schedule_factor_matches_the_trainers():
    from workers.tasks import lr_schedule

    ours, theirs = e2e_quality.schedule_factor(5, 40), lr_schedule("linear", 5, 40)
    assert [ours(s) for s in range(41)] == [theirs(s) for s in range(41)]


def write_history(path: Path, losses):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join(json.dumps({"step": i + 1, "loss": v, "learning_rate": 1e-3}) + "\n" for i, v in enumerate(losses))
    )


def multitask_json(path: Path):
    """The fields of multitask.py's --json output that plots.py reads, for N = 1, 4, 16."""
    summary = [
        {
            "n": n,
            "clock": "cpu",
            "a_tokens_per_s": 300.0 + 10 * n,
            "b_tokens_per_s": 280.0,
            "a_peak_rss_bytes": (1.5 + 0.01 * n) * 2**30,
            "c_peak_rss_bytes": n * 1.6 * 2**30,
        }
        for n in (1, 4, 16)
    ]
    path.write_text(
        json.dumps(
            {"benchmark": "multitask", "summary": summary, "raw": {"peft_single": {"peak_rss_bytes": 1.6 * 2**30}}}
        )
    )


def test_plots_script_writes_the_three_pngs(tmp_path):
    hist = tmp_path / "histories"
    for task, base in (("e2e", 3.0), ("reverse", 4.0), ("uppercase", 2.5), ("numwords", 3.5)):
        write_history(hist / "joint-seed0" / f"{task}.jsonl", [base / (1 + 0.1 * s) for s in range(30)])
    write_history(hist / "prefixd-seed0" / "e2e.jsonl", [3.0 / (1 + 0.1 * s) for s in range(30)])
    multitask_json(tmp_path / "multitask.json")
    out = tmp_path / "pngs"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "plots.py"),
            "--history-dir",
            str(hist),
            "--multitask-json",
            str(tmp_path / "multitask.json"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert proc.returncode == 0, proc.stderr
    for name in ("loss_curves.png", "multitask_throughput.png", "multitask_memory.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    assert proc.stdout.split() == [
        str(out / n) for n in ("loss_curves.png", "multitask_throughput.png", "multitask_memory.png")
    ]


def test_plots_read_runs_and_reject_a_foreign_json(tmp_path):
    write_history(tmp_path / "h" / "peft-seed0" / "e2e.jsonl", [2.0, 1.0])
    write_history(tmp_path / "h" / "joint-seed0" / "a.jsonl", [2.0, float("nan"), 1.0])
    write_history(tmp_path / "h" / "joint-seed0" / "b.jsonl", [3.0])
    runs = plots.find_runs(tmp_path / "h")
    assert list(runs) == ["joint-seed0", "peft-seed0"]  # multi-task runs first
    assert [r["loss"] for r in runs["joint-seed0"]["a"]] == [2.0, 1.0]  # the NaN line is skipped
    assert list(plots.find_runs(tmp_path / "h", ["peft"])) == ["peft-seed0"]
    assert plots.smooth([1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0])
    (tmp_path / "other.json").write_text(json.dumps({"summary": [{"n": 1}]}))
    with pytest.raises(SystemExit, match="not multitask.py's JSON format"):
        plots.read_multitask(tmp_path / "other.json")
