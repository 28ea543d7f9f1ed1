"""How much of a group's time goes to evaluation, with the evaluation bound and without it.

    python benchmarks/eval_share.py                # the four example specs on SmolLM2-135M, plus a task with a
                                                   # 2,000-row validation file, trained together as one group
    python benchmarks/eval_share.py --quick        # a tiny model: the smoke test

The example specs train together in one trainer, as the demo's group does, beside a fifth task whose
validation file has `--validation-rows` rows (the case where one co-tenant's evaluation used to stall every
other task). Each setting of `training.eval_max_rows` (default: 256, the spec's default, against one that
scores every row at each evaluation) runs the same jobs to the end; a step's evaluation time is its wall time
minus the trainer's own step time (forward, backward, optimizer; checkpoints are turned off). Prints each
setting's training and evaluation seconds and evaluation's share of the group's time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import tempfile
import time
from pathlib import Path

from common import ROOT, format_table, set_threads, tiny_spec  # noqa: E402

EXAMPLES = ["capitals", "number_words", "reverse_words", "past_tense"]


def big_validation_task(work: Path, rows: int, template_spec: Path) -> Path:
    """A fifth spec: reverse-words-like prompts with a `rows`-row validation file."""
    import yaml

    rng = random.Random(0)
    words = "apple river stone cloud garden window bread candle forest mirror silver honey".split()

    def row():
        picked = rng.sample(words, 3)
        return {"prompt": f"Reverse the list: {', '.join(picked)}\nReversed:", "target": " " + ", ".join(picked[::-1])}

    for name, n in (("big.train.jsonl", 200), ("big.valid.jsonl", rows)):
        (work / name).write_text("".join(json.dumps(row()) + "\n" for _ in range(n)))
    doc = yaml.safe_load(template_spec.read_text())
    doc["name"] = "big-validation"
    doc["data"] = {
        "train": str(work / "big.train.jsonl"),
        "validation": str(work / "big.valid.jsonl"),
        "input_column": "prompt",
        "target_column": "target",
        "max_length": 48,
    }
    path = work / "big.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run(specs: list, max_rows: int, work: Path, steps: int | None = None) -> dict:
    from orchestrator.plan import base_model_ref, task_config
    from workers.models import load_base_model
    from workers.trainer import MultiTaskTrainer

    model, tokenizer = load_base_model(base_model_ref(specs[0]))
    trainer = MultiTaskTrainer(model, tokenizer, data_cache_dir=str(work / "cache"))
    for i, spec in enumerate(specs):
        training = dataclasses.replace(spec.training, eval_max_rows=max_rows, checkpoint_every=10**6)
        if steps is not None:  # shorter runs: evaluations at a third and two thirds, and at the end
            training = dataclasses.replace(training, steps=steps, epochs=None, eval_every=max(1, steps // 3))
        spec = dataclasses.replace(spec, training=training)
        trainer.add_task(task_config(spec, f"t{i}-{max_rows}", work / f"out-{max_rows}" / f"t{i}"))
    train_s = wall_s = 0.0
    while trainer.active:
        start = time.perf_counter()
        report = trainer.step()
        wall_s += time.perf_counter() - start
        train_s += report.step_time_s
    return {"eval_max_rows": max_rows, "train_s": train_s, "eval_s": wall_s - train_s, "wall_s": wall_s}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--validation-rows", type=int, default=2000)
    parser.add_argument("--max-rows", type=int, nargs="+", default=[256, 100_000])
    parser.add_argument("--steps", type=int, help="train each task this many steps (default: its spec's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--quick", action="store_true", help="a tiny model and task, 200 validation rows")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    from jobs.spec import load_spec

    with tempfile.TemporaryDirectory(prefix="prefixd-eval-share-") as tmp:
        work = Path(tmp)
        if args.quick:
            paths = [tiny_spec(work, steps=6)]
            rows = 200
        else:
            paths = [ROOT / "jobs" / "examples" / f"{n}.yaml" for n in EXAMPLES]
            rows = args.validation_rows
        paths.append(big_validation_task(work, rows, paths[0]))
        specs = [load_spec(p) for p in paths]
        results = []
        for max_rows in args.max_rows:
            results.append(run(specs, max_rows, work, args.steps))
            print(f"eval_share: eval_max_rows {max_rows} done", flush=True)
    rows_out = [
        [
            str(r["eval_max_rows"]),
            f"{r['train_s']:.1f}",
            f"{r['eval_s']:.1f}",
            f"{r['wall_s']:.1f}",
            f"{r['eval_s'] / r['wall_s']:.0%}",
        ]
        for r in results
    ]
    print(f"{len(specs)} tasks in one group, one with {rows} validation rows")
    print(format_table(["eval_max_rows", "train s", "eval s", "group s", "eval share"], rows_out))
    report = {"tasks": [s.name for s in specs], "validation_rows": rows, "results": results}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
