"""How far `prefixd estimate` lands from what the example jobs then measure: tokens, time and memory.

    python benchmarks/estimate.py                  # the four example specs on SmolLM2-135M, each trained alone
    python benchmarks/estimate.py --quick          # a tiny model and task: the smoke test

Each spec is estimated (`orchestrator.estimates.estimate_spec`), then trained alone to the end in a fresh
process that measures its tokens, its training time (the trainer's step times: evaluation excluded, as in
the estimate) and its peak resident memory above the process's size before the model loads. The time
estimate of spec k uses the throughput measured on spec k-1 (as the service uses a base model's measured
throughput); the first one uses the stated default. Prints each estimate against its measurement.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, format_table, peak_rss_bytes, set_threads, tiny_spec  # noqa: E402

EXAMPLES = ["capitals", "number_words", "reverse_words", "past_tense"]


def measure(spec_path: Path, work: Path, threads: int) -> dict:
    """Train the spec alone in this process: tokens, step seconds, peak RSS above the start."""
    set_threads(threads)
    from jobs.spec import load_spec
    from orchestrator.plan import base_model_ref, task_config
    from workers.models import load_base_model
    from workers.trainer import MultiTaskTrainer

    spec = load_spec(spec_path)
    before = _rss_bytes()
    model, tokenizer = load_base_model(base_model_ref(spec))
    trainer = MultiTaskTrainer(model, tokenizer, data_cache_dir=str(work / "cache"))
    trainer.add_task(task_config(spec, "measured", work / "out"))
    tokens, seconds = 0, 0.0
    while trainer.active:
        report = trainer.step()
        tokens, seconds = tokens + report.tokens, seconds + report.step_time_s
    return {"tokens": tokens, "seconds": seconds, "memory_bytes": peak_rss_bytes() - before}


def _rss_bytes() -> int:
    """This process's resident memory now (the peak, `peak_rss_bytes`, may be an earlier import's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--quick", action="store_true", help="a tiny model and task, estimated twice")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # child process: one spec, JSON out
    args = parser.parse_args(argv)
    if args.measure:
        with tempfile.TemporaryDirectory(prefix="prefixd-estimate-") as tmp:
            print(json.dumps(measure(args.measure, Path(tmp), args.threads)))
        return {}

    from jobs.spec import load_spec
    from orchestrator.estimates import Throughput, estimate_spec

    rows, out = [], []
    with tempfile.TemporaryDirectory(prefix="prefixd-estimate-") as tmp:
        work = Path(tmp)
        paths = (
            [tiny_spec(work, steps=8)] * 2
            if args.quick
            else [ROOT / "jobs" / "examples" / f"{n}.yaml" for n in EXAMPLES]
        )
        throughput = Throughput.default()
        for path in paths:
            spec = load_spec(path)
            est = estimate_spec(spec, throughput=throughput, data_cache=str(work / "cache"))
            child = subprocess.run(
                [sys.executable, __file__, "--measure", str(path), "--threads", str(args.threads)],
                capture_output=True,
                text=True,
                check=True,
            )
            got = json.loads(child.stdout.strip().splitlines()[-1])
            errors = {
                "tokens": est["total_tokens"] / got["tokens"] - 1,
                "seconds": est["seconds"] / got["seconds"] - 1,
                "memory": est["peak_memory_bytes"] / got["memory_bytes"] - 1 if got["memory_bytes"] > 0 else None,
            }
            out.append({"spec": spec.name, "estimate": est, "measured": got, "relative_error": errors})
            rows.append(
                [
                    spec.name,
                    f"{est['total_tokens']} / {got['tokens']}",
                    f"{est['seconds']:.1f} / {got['seconds']:.1f}",
                    f"{errors['seconds']:+.0%}",
                    f"{est['peak_memory_bytes'] / 2**20:.0f} / {got['memory_bytes'] / 2**20:.0f}",
                    "-" if errors["memory"] is None else f"{errors['memory']:+.0%}",
                    "default" if throughput.tokens_per_s is None else "previous job",
                ]
            )
            print(f"estimate: {spec.name} done", flush=True)
            throughput = Throughput.measured(got["tokens"] / got["seconds"], f"the run of {spec.name}")
    header = ["spec", "tokens est / got", "train s est / got", "time err", "MiB est / got", "mem err", "throughput"]
    print(format_table(header, rows))
    report = {"threads": args.threads, "specs": out}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
