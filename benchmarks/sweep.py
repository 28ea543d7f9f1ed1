"""A hyperparameter sweep trained jointly, as co-tenants of one trainer, against the same variants one after another.

    python benchmarks/sweep.py                               # capitals example, 6 learning rates x 2 prefix lengths
    python benchmarks/sweep.py --steps 20 --json out.json    # shorter
    python benchmarks/sweep.py --quick                       # a tiny model and task: the smoke test

The variants come from a `sweep:` section expanded and validated like a submitted spec (`jobs.spec.parse_specs`).
(a) all variants in one `MultiTaskTrainer` until every one finishes; (b) the same variants one at a time over
the same resident base model (each trained to the end before the next is added). The time is the trainer's
steps, evaluations included (reading the data is left out: the same work either way). Both pick the best variant
by the spec's registry metric and direction, as the registry's champion rule does; the variants' final
metrics must agree between (a) and (b) (co-tenants train as if alone), so the pick is the same. Prints wall
time of each and the ratio b/a.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import ROOT, format_table, set_threads, tiny_spec  # noqa: E402

GRID = {
    "training.learning_rate": [0.003, 0.01, 0.02, 0.03, 0.05, 0.1],
    "prefix.num_virtual_tokens": [5, 10],
}


def load_variants(spec_path: Path, steps: int | None, grid: dict, work: Path):
    import yaml

    from jobs.reader import read_spec_file
    from jobs.spec import parse_specs

    document = read_spec_file(spec_path)
    if steps is not None:
        document["training"] = {k: v for k, v in document["training"].items() if k != "epochs"} | {"steps": steps}
        document["training"]["eval_every"] = steps
        document["training"]["checkpoint_every"] = steps
    document["sweep"] = {"method": "grid", "parameters": grid}
    (work / "sweep.yaml").write_text(yaml.safe_dump(document))
    return parse_specs(document, base_dir=spec_path.resolve().parent, source=str(spec_path))


def train(model, tokenizer, configs: list, work: Path, joint: bool) -> tuple[float, dict[str, dict]]:
    """Seconds spent in the trainer's steps (evaluations included; reading and tokenizing the data, which
    is the same work either way and cached after the first mode, left out) and {task_id: final metrics};
    joint: every config at once, else one after another."""
    from workers.trainer import MultiTaskTrainer

    trainer = MultiTaskTrainer(model, tokenizer, data_cache_dir=str(work / "cache"))
    metrics, seconds = {}, 0.0
    for batch in [configs] if joint else [[c] for c in configs]:
        for config in batch:
            trainer.add_task(config)
        while trainer.active:
            start = time.perf_counter()
            report = trainer.step()
            seconds += time.perf_counter() - start
            for result in report.finished:
                metrics[result.task_id] = result.metrics
    return seconds, metrics


def best(metrics: dict[str, dict], metric: str, direction: str) -> str:
    pick = min if direction == "minimize" else max
    return pick(metrics, key=lambda task_id: metrics[task_id][metric])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=ROOT / "jobs" / "examples" / "capitals.yaml")
    parser.add_argument("--steps", type=int, help="train each variant this many steps (default: the spec's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--quick", action="store_true", help="a tiny model and task, 4 variants: the smoke test")
    args = parser.parse_args(argv)
    set_threads(args.threads)

    from orchestrator.plan import base_model_ref, task_config
    from workers.models import load_base_model

    with tempfile.TemporaryDirectory(prefix="prefixd-sweep-") as tmp:
        work = Path(tmp)
        spec_path = tiny_spec(work, steps=6) if args.quick else args.spec
        grid = {"training.learning_rate": [0.01, 0.03], "prefix.num_virtual_tokens": [4, 8]} if args.quick else GRID
        variants = load_variants(spec_path, args.steps, grid, work)
        spec0 = variants[0][1]
        model, tokenizer = load_base_model(base_model_ref(spec0))
        labels = {f"v{i}": label for i, (label, _) in enumerate(variants)}
        runs = {}
        for mode in ("sequential", "joint"):  # the first mode also fills the data cache; neither times it
            configs = [task_config(s, f"v{i}", work / mode / f"v{i}") for i, (_, s) in enumerate(variants)]
            runs[mode] = train(model, tokenizer, configs, work, joint=mode == "joint")
            print(f"sweep: {mode}: {len(configs)} variants in {runs[mode][0]:.1f} s", flush=True)

    metric, direction = spec0.registry.metric, spec0.registry.direction
    (a_s, a_metrics), (b_s, b_metrics) = runs["joint"], runs["sequential"]
    rows = [
        [labels[v], f"{a_metrics[v][metric]:.4f}", f"{b_metrics[v][metric]:.4f}"]
        for v in sorted(labels, key=lambda v: int(v[1:]))
    ]
    print(format_table(["variant", f"{metric} (a) joint", f"{metric} (b) one at a time"], rows))
    picks = {"joint": best(a_metrics, metric, direction), "sequential": best(b_metrics, metric, direction)}
    worst = max(abs(a_metrics[v][metric] - b_metrics[v][metric]) for v in labels)
    print(
        f"\n{len(labels)} variants of {spec0.name} ({metric}, {direction}): (a) {a_s:.1f} s, (b) {b_s:.1f} s, "
        f"b/a {b_s / a_s:.2f}x; best variant: (a) {labels[picks['joint']]}, (b) {labels[picks['sequential']]}; "
        f"largest metric difference between (a) and (b): {worst:.2e}"
    )
    report = {
        "spec": str(spec_path) if not args.quick else "quick",
        "variants": labels,
        "metric": metric,
        "direction": direction,
        "joint_s": a_s,
        "sequential_s": b_s,
        "ratio": b_s / a_s,
        "best": {k: labels[v] for k, v in picks.items()},
        "metrics": {"joint": a_metrics, "sequential": b_metrics},
        "largest_metric_difference": worst,
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
