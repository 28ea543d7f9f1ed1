"""`prefixd generate --pairs FILE` on a tiny Llama registered in a throwaway sqlite MLflow: each prompt runs
with its own task's prefix (rows of two tasks in one batch) and on the bare model, each output marked
against its expected answer."""

import json

import torch

from orchestrator.cli import main
from orchestrator.plan import base_model_ref
from orchestrator.registry import default_tracking_uri, register_pending
from orchestrator.store import JobStore
from tests.test_registry import finished_job, quiet_mlflow, trained  # noqa: F401  (fixtures)
from workers.formats import load_prefix
from workers.generate import generate_texts
from workers.inject import PrefixedModel
from workers.models import load_base_model

ROWS = [("rev", "rev abcd="), ("dbl", "dbl 12="), ("rev", "rev hg=")]  # different lengths: left padding


def generate(uri, pairs, *extra):
    """`prefixd generate --pairs FILE` on the CPU, 8 new tokens: its exit status."""
    argv = ["generate", "--mlflow-uri", uri, "--pairs", str(pairs), "--device", "cpu", "--max-new-tokens", "8"]
    return main(argv + list(extra))


def test_pairs_each_prompt_with_its_own_task_marked_right_or_wrong(trained, tmp_path, capsys):  # noqa: F811
    uri = default_tracking_uri(tmp_path / "home")
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    for name, spec in trained["specs"].items():
        finished_job(store, spec, trained["results"][name], tmp_path / name)
    assert len(register_pending(store, uri)) == 2

    model, tokenizer = load_base_model(base_model_ref(trained["specs"]["rev"]))
    pm = PrefixedModel(model)
    with torch.no_grad():
        prefix = {
            n: load_prefix(trained["results"][n] / "prefix", model.config)[1].prompt_embeddings()
            for n in ("rev", "dbl")
        }
    alone = [generate_texts(pm, tokenizer, [prefix[t]], [0], [p], max_new_tokens=8)[0] for t, p in ROWS]
    bare = [generate_texts(pm, tokenizer, None, None, [p], max_new_tokens=8)[0] for _, p in ROWS]
    # the test can tell the prefixes apart: the dbl prompt with rev's prefix, and with none, says something else
    swapped = generate_texts(pm, tokenizer, [prefix["rev"]], [0], [ROWS[1][1]], max_new_tokens=8)[0]
    assert alone[1] != swapped and alone[1] != bare[1] and alone[0] != bare[0]

    pairs = tmp_path / "pairs.jsonl"
    expected = [alone[0], alone[1] + "x", None]  # right, wrong, unscored
    pairs.write_text(
        "".join(
            json.dumps({"task": t, "prompt": p} | ({"expected": e} if e is not None else {})) + "\n"
            for (t, p), e in zip(ROWS, expected)
        )
    )
    capsys.readouterr()
    assert generate(uri, pairs, "--json", "--with-base") == 0
    results = json.loads(capsys.readouterr().out)
    assert [(r["task"], r["name"], r["version"], r["prompt"]) for r in results] == [
        (t, f"prefixd-{t}", "1", p) for t, p in ROWS
    ]
    assert [r["output"] for r in results] == alone
    assert [r["base_output"] for r in results] == bare
    assert [r["right"] for r in results] == [True, False, None]
    assert [r["base_right"] for r in results] == [bare[0].strip() == alone[0].strip(), False, None]

    assert generate(uri, pairs) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "== rev (prefixd-rev v1): with its prefix 1/1 right"
    assert [c.strip() for c in out[1].split(" | ")] == [
        ROWS[0][1],
        f"expected: {alone[0]}",
        f"prefix: {alone[0]}  [right]",
    ]
    assert [c.strip() for c in out[2].split(" | ")] == [ROWS[2][1], "expected:", f"prefix: {alone[2]}"]
    assert out[1].index(" | ") == out[2].index(" | ")  # columns aligned
    assert out[3] == "== dbl (prefixd-dbl v1): with its prefix 0/1 right"
    assert out[4] == f"  {ROWS[1][1]} | expected: {alone[1]}x | prefix: {alone[1]}  [wrong]"


def test_pairs_refuses_tasks_or_prompts_beside_it_and_unknown_tasks(tmp_path, capsys):
    uri = default_tracking_uri(tmp_path / "home")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"task": "nope", "prompt": "rev ab="}) + "\n")
    for extra, message in [
        (["--task", "rev"], "give no --task or PROMPT"),
        (["rev ab="], "give no --task or PROMPT"),
        ([], "no registered model for task or model 'nope'"),
    ]:
        capsys.readouterr()
        assert generate(uri, pairs, *extra) == 2
        err = capsys.readouterr().err
        assert err.splitlines()[-1].startswith("prefixd generate: ") and message in err, err
    capsys.readouterr()
    assert main(["generate", "--mlflow-uri", uri, "rev ab="]) == 2
    assert "give at least one --task and one PROMPT (or --pairs FILE)" in capsys.readouterr().err
