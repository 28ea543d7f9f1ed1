"""PNG plots of the benchmarks' outputs (matplotlib, Agg backend: no display needed).

    python benchmarks/plots.py --history-dir benchmarks/results/histories \
        --multitask-json benchmarks/results/multitask.json            # -> benchmarks/results/*.png

Writes into --out (default benchmarks/results/):
  loss_curves.png           per-step training loss of each task, one panel per run, from
                            --history-dir: DIR/<run>/<task>.jsonl (as `e2e_quality.py --history-dir`
                            writes them: runs prefixd-seed0, peft-seed0, joint-seed0, ...), or *.jsonl files
                            directly in DIR (one run). Each line a JSON object with "step" and "loss" (the
                            trainer's history.jsonl). Runs named joint-* (several tasks in one trainer) come
                            first; --runs picks runs by name prefix.
  multitask_throughput.png  tokens/s against the number of tasks N: prefixd (one MultiTaskTrainer, all N
                            tasks) against PEFT (one task after another), from `multitask.py --json OUT`.
  multitask_memory.png      peak resident memory against N from the same JSON: prefixd's joint trainer,
                            PEFT one task after another (one single-task PEFT process: it holds one task
                            at a time), and N single-task PEFT processes side by side (N x that).
The multitask JSON fields read (multitask.py's format): summary[i].n, .a_tokens_per_s, .b_tokens_per_s,
.clock, .a_peak_rss_bytes, .c_peak_rss_bytes; raw.peft_single.peak_rss_bytes; .a0_tokens_per_s when the run
had --compare-eager (then a third line: prefixd with eager layers). Either input may be left
out; its plots are then skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
GiB = 2**30
MAX_PANELS = 6


def read_history(path: Path) -> list[dict]:
    """JSON lines -> records; lines without a finite 'loss' are skipped."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            if isinstance(record.get("loss"), (int, float)) and record["loss"] == record["loss"]:
                records.append(record)
    return records


def find_runs(history_dir: Path, prefixes: list[str] | None = None) -> dict[str, dict[str, list[dict]]]:
    """{run name: {task: records}}: subfolders of history_dir, or history_dir itself if it holds *.jsonl."""
    if not history_dir.is_dir():
        raise SystemExit(f"plots: --history-dir {history_dir}: no such folder")
    folders = (
        [history_dir] if any(history_dir.glob("*.jsonl")) else sorted(p for p in history_dir.iterdir() if p.is_dir())
    )
    runs = {}
    for folder in folders:
        if prefixes and not any(folder.name.startswith(p) for p in prefixes):
            continue
        tasks = {f.stem: read_history(f) for f in sorted(folder.glob("*.jsonl"))}
        tasks = {k: v for k, v in tasks.items() if v}
        if tasks:
            runs[folder.name] = tasks
    # Multi-task runs first: they are what this plot is for.
    return dict(sorted(runs.items(), key=lambda kv: (len(kv[1]) == 1, kv[0])))


def smooth(values: list[float], weight: float = 0.8) -> list[float]:
    """Exponential moving average (TensorBoard-style), bias-corrected at the start."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def plot_loss_curves(runs: dict[str, dict[str, list[dict]]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(runs)[:MAX_PANELS]
    cols = min(3, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False, sharey=True)
    for ax, name in zip(axes.flat, names):
        for i, (task, records) in enumerate(runs[name].items()):
            steps = [r.get("step", k + 1) for k, r in enumerate(records)]
            loss = [r["loss"] for r in records]
            color = f"C{i}"
            ax.plot(steps, loss, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(steps, smooth(loss), color=color, linewidth=1.8, label=task)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("training loss (nats / target token)")
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle("Training loss per task (faint: per step; solid: moving average)", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def read_multitask(path: Path) -> tuple[list[dict], str]:
    """(per-N points sorted by N, the model's description) from multitask.py's JSON; SystemExit naming
    the missing field."""
    report = json.loads(path.read_text(encoding="utf-8"))
    try:
        single_peft = report["raw"]["peft_single"]["peak_rss_bytes"]
        points = [
            {
                "n": s["n"],
                "a_tokens_per_s": s["a_tokens_per_s"],
                "b_tokens_per_s": s["b_tokens_per_s"],
                "clock": s.get("clock", "?"),
                "a_rss": s["a_peak_rss_bytes"],
                "b_rss": single_peft,
                "c_rss": s["c_peak_rss_bytes"],
                "a0_tokens_per_s": s.get("a0_tokens_per_s"),
            }
            for s in report["summary"]
        ]
    except (KeyError, TypeError) as e:
        raise SystemExit(
            f"plots: {path}: not multitask.py's JSON format (missing {e}); see this script's docstring"
        ) from None
    model = report.get("config", {}).get("model", "model not recorded")
    return sorted(points, key=lambda p: p["n"]), model


def plot_throughput(points: list[dict], model: str, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [p["n"] for p in points]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(n, [p["a_tokens_per_s"] for p in points], "o-", label="prefixd: one trainer, N tasks jointly")
    if all(p["a0_tokens_per_s"] for p in points):  # --compare-eager ran
        ax.plot(n, [p["a0_tokens_per_s"] for p in points], "^:", label="prefixd, eager layers")
    ax.plot(n, [p["b_tokens_per_s"] for p in points], "s--", label="PEFT: one task after another")
    for p in points:  # the ratio, on the side of prefixd's point away from PEFT's line
        below = p["a_tokens_per_s"] < p["b_tokens_per_s"]
        ax.annotate(
            f"{p['a_tokens_per_s'] / p['b_tokens_per_s']:.2f}x",
            (p["n"], p["a_tokens_per_s"]),
            textcoords="offset points",
            xytext=(0, -13 if below else 7),
            ha="center",
            fontsize=8,
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(n, [str(x) for x in n])
    highest = max(max(p["a_tokens_per_s"], p["b_tokens_per_s"], p["a0_tokens_per_s"] or 0) for p in points)
    ax.set_ylim(bottom=0, top=highest * 1.12)  # room for the ratio labels above the points
    ax.set_xlabel("number of tasks N")
    ax.set_ylabel(f"training tokens/s ({points[0]['clock']} clock)")
    ax.set_title(f"Training throughput against task count (labels: prefixd / PEFT)\n{model}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_memory(points: list[dict], model: str, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    n = [p["n"] for p in points]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(n, [p["a_rss"] / GiB for p in points], "o-", label="prefixd: one trainer, N tasks")
    ax.plot(n, [p["b_rss"] / GiB for p in points], "s--", label="PEFT one after another (1 process, 1 task at a time)")
    ax.plot(n, [p["c_rss"] / GiB for p in points], "^:", label="PEFT, N processes side by side (N x one)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(n, [str(x) for x in n])
    values = [p[k] for p in points for k in ("a_rss", "b_rss", "c_rss")]
    if max(values) / min(values) > 10:  # N side-by-side processes grow with N: a log axis keeps (a) readable
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_ylabel("peak resident memory (GiB, log scale)")
    else:
        ax.set_ylim(bottom=0)
        ax.set_ylabel("peak resident memory (GiB)")
    for p in points:
        ax.annotate(
            f"{p['a_rss'] / GiB:.2f}",
            (p["n"], p["a_rss"] / GiB),
            textcoords="offset points",
            xytext=(0, 7),
            ha="center",
            fontsize=8,
        )
    ax.set_xlabel("number of tasks N")
    ax.set_title(f"Peak memory against task count (labels: prefixd GiB)\n{model}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--history-dir",
        default=str(RESULTS / "histories"),
        help="folder of run subfolders of <task>.jsonl (default benchmarks/results/histories)",
    )
    parser.add_argument("--runs", default=None, help="comma-separated run-name prefixes to plot (default: all)")
    parser.add_argument(
        "--multitask-json",
        default=str(RESULTS / "multitask.json"),
        help="multitask.py --json output (default benchmarks/results/multitask.json)",
    )
    parser.add_argument("--out", default=str(RESULTS), help="output folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    history_dir = Path(args.history_dir)
    if history_dir.exists():
        runs = find_runs(history_dir, args.runs.split(",") if args.runs else None)
        if runs:
            written.append(plot_loss_curves(runs, out / "loss_curves.png"))
        else:
            print(f"plots: no histories under {history_dir}: loss_curves.png skipped", file=sys.stderr)
    else:
        print(f"plots: {history_dir} does not exist: loss_curves.png skipped", file=sys.stderr)
    multitask = Path(args.multitask_json)
    if multitask.is_file():
        points, model = read_multitask(multitask)
        written.append(plot_throughput(points, model, out / "multitask_throughput.png"))
        written.append(plot_memory(points, model, out / "multitask_memory.png"))
    else:
        print(
            f"plots: {multitask} does not exist: multitask_throughput.png and multitask_memory.png skipped "
            "(run benchmarks/multitask.py --json OUT)",
            file=sys.stderr,
        )
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
