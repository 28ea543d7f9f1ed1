"""Base-model memory per rank and step time of a ZeRO-3 worker group, W = 1 and 2, side by side.

    .venv/bin/python benchmarks/zero_memory.py                # SmolLM2-135M, W = 1, 2
    .venv/bin/python benchmarks/zero_memory.py --quick        # tiny Llama, a few steps (smoke test)

Each W runs as W real processes (gloo on CPU, NCCL on GPUs) that load the base model partitioned with
ZeRO-3 (persistence threshold 0, so every parameter is partitioned) and train 4 tasks together for
--steps steps. Per rank it reports the base-model elements and bytes it holds, and the median step time.
Target: base memory per rank at W=2 about 1/2 of W=1. On a CPU machine the ranks share the same cores,
so step time at W=2 shows the cost of gathering, not a speed-up; on a GPU cluster each rank has its own
device.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rank_main(args) -> None:
    import torch.distributed as dist

    from jobs.fields import TrainingSpec
    from workers.data import DataSettings
    from workers.models import BaseModelRef
    from workers.prefix import PrefixTuningConfig
    from workers.trainer import MultiTaskTrainer, TaskConfig
    from workers.zero import ZeroSettings, init_group, load_group_model

    coll = init_group(args.rank, args.world, "127.0.0.1", args.port)
    ref = (
        BaseModelRef(kind="path", location=args.model)
        if args.model
        else BaseModelRef(kind="builtin", location="smollm2-135m", dtype=args.dtype)
    )
    model, tok, info = load_group_model(ref, ZeroSettings(stage=3, persistence_threshold=0), coll)
    element_bytes = next(model.parameters()).element_size()
    trainer = MultiTaskTrainer(model, tok, micro_batch_size=16, collectives=coll, device=coll.device)
    work = Path(args.work)
    for i in range(4):
        trainer.add_task(
            TaskConfig(
                task_id=f"t{i}",
                name=f"t{i}",
                out_dir=str(work / f"w{args.world}" / f"t{i}"),
                data=DataSettings(
                    train=str(work / "data.jsonl"), input_column="input", target_column="target", max_length=64
                ),
                metric="eval_loss",
                direction="minimize",
                prefix=PrefixTuningConfig(num_virtual_tokens=10),
                training=TrainingSpec(
                    steps=args.steps + 1, examples_per_step=4, eval_every=10**6, checkpoint_every=10**6, seed=i
                ),
            )
        )
    times = []
    for _ in range(args.steps):
        times.append(trainer.step().step_time_s)
    print(
        "RESULT "
        + json.dumps(
            {
                "world": args.world,
                "rank": args.rank,
                "local_elements": info.local_elements,
                "total_elements": info.total_elements,
                "local_bytes": info.local_elements * element_bytes,
                "step_s": statistics.median(times[1:] or times),
            }
        ),
        flush=True,
    )
    dist.destroy_process_group()


def write_data(path: Path, n: int = 200) -> None:
    import random

    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()
    with open(path, "w") as f:
        for _ in range(n):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(8, 20)))
            f.write(json.dumps({"input": f"Repeat: {text}\n", "target": " " + text}) + "\n")


def run_group(world: int, args, work: Path, model: str | None) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        __file__,
        "--rank-of",
        str(world),
        "--port",
        str(port),
        "--work",
        str(work),
        "--steps",
        str(args.steps),
        "--dtype",
        args.dtype,
    ] + (["--model", model] if model else [])
    procs = [
        subprocess.Popen(
            cmd + ["--rank", str(r)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=os.environ | {"OMP_NUM_THREADS": str(max(1, args.threads // world))},
        )
        for r in range(world)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=3600)
        if p.returncode != 0:
            raise SystemExit(f"rank failed:\n{err[-4000:]}")
        results += [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
    return sorted(results, key=lambda r: r["rank"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--worlds", default="1,2")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--quick", action="store_true", help="tiny Llama, 3 steps")
    parser.add_argument("--json", help="write the results here")
    # one rank of a group (used by the benchmark itself)
    parser.add_argument("--rank", type=int)
    parser.add_argument("--rank-of", dest="world", type=int)
    parser.add_argument("--port", type=int)
    parser.add_argument("--work")
    parser.add_argument("--model")
    args = parser.parse_args()
    if args.rank is not None:
        return rank_main(args)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_data(work / "data.jsonl")
        model = None
        if args.quick:
            args.steps = 3
            from tests.tiny import save_tiny_base

            model = str(work / "tiny")
            save_tiny_base(model)
        rows = []
        for world in map(int, args.worlds.split(",")):
            t = time.perf_counter()
            rows += run_group(world, args, work, model)
            print(f"W={world}: {time.perf_counter() - t:.0f} s wall", file=sys.stderr)
    base = {r["world"]: r for r in rows if r["rank"] == 0}
    print(
        f"ZeRO-3 base model per rank ({'tiny llama' if args.quick else 'SmolLM2-135M ' + args.dtype}), "
        f"4 tasks x 4 examples per step, median of {args.steps} steps"
    )
    print(f"{'W':>2} {'rank':>4} {'base elements':>14} {'of':>12} {'MiB':>8} {'vs W=1':>7} {'step s':>7}")
    for r in rows:
        ratio = r["local_bytes"] / base[1]["local_bytes"] if 1 in base else float("nan")
        print(
            f"{r['world']:>2} {r['rank']:>4} {r['local_elements']:>14,} {r['total_elements']:>12,} "
            f"{r['local_bytes'] / 2**20:>8.1f} {ratio:>7.3f} {r['step_s']:>7.3f}"
        )
    if 1 in base and 2 in base:
        ratio = max(r["local_bytes"] for r in rows if r["world"] == 2) / base[1]["local_bytes"]
        print(
            f"base memory per rank W=2 / W=1: {ratio:.3f} (target about 0.5: {'PASS' if ratio <= 0.55 else 'MISS'}); "
            f"step time W=2 / W=1: {base[2]['step_s'] / base[1]['step_s']:.2f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
