"""Where a multi-task step's time goes (multitask.py's (a)): fp32 product rates by rows, and one profiled step.

    python benchmarks/matmul_rows.py                 # product rates at 256 / 512 / 1024 rows: ~2 min on 1 core
    python benchmarks/matmul_rows.py --profile-step  # also torch.profiler around one 16-task step: ~3 min more
    python benchmarks/matmul_rows.py --quick         # smaller: the smoke test

Rates: the products of one SmolLM2-shaped decoder layer's projections at M rows (M = 4-row micro-batches of
64 tokens = 256, and 512, 1024), forward (x @ W^T) and backward (g @ W, the activation gradient only), with the
weights of --layers separate layers, so that they stream from memory as in a training step, not from cache.
Freed memory is kept in the process as the trainer keeps it (workers/allocator.py).
Also the same work with q/k/v and gate/up fused into one product each ("fused"), and the reference of
benchmarks/multitask.py ([1024 x 576] @ [576 x 1536], one cache-hot weight). Variants alternate within each
of --rounds rounds (order reversed every other round); medians of CPU time, 1 thread.

--profile-step: one 16-task `MultiTaskTrainer` step (4-row micro-batches, compiled layers) under
torch.profiler; prints the share of the step's self CPU time in matrix products and each product shape's rate,
then how the rest splits: the compiled graphs' own kernels, the attention's batched matmuls, everything else.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import format_table  # noqa: E402

from workers import allocator  # noqa: E402

HIDDEN, KV, INTERMEDIATE = 576, 192, 1536  # SmolLM2-135M


def layer_weights(layers: int, gen: torch.Generator) -> list[dict[str, torch.Tensor]]:
    shapes = {"q": HIDDEN, "k": KV, "v": KV, "o": HIDDEN, "gate": INTERMEDIATE, "up": INTERMEDIATE}
    out = []
    for _ in range(layers):
        w = {name: torch.randn(n, HIDDEN, generator=gen) * 0.02 for name, n in shapes.items()}
        w["down"] = torch.randn(HIDDEN, INTERMEDIATE, generator=gen) * 0.02
        w["qkv"], w["gate_up"] = torch.cat([w["q"], w["k"], w["v"]]), torch.cat([w["gate"], w["up"]])
        out.append(w)
    return out


def layer_flops(rows: int) -> int:
    """Forward + activation-gradient FLOPs of one layer's projections."""
    per_row = HIDDEN * (HIDDEN + 2 * KV + HIDDEN + 2 * INTERMEDIATE) + INTERMEDIATE * HIDDEN
    return 2 * 2 * rows * per_row


def separate(ws, x, xi, grads):
    for w in ws:
        for name in ("q", "k", "v", "o", "gate", "up"):
            F.linear(x, w[name])
            grads[name] @ w[name]
        F.linear(xi, w["down"])
        grads["down"] @ w["down"]


def fused(ws, x, xi, grads):
    for w in ws:
        F.linear(x, w["qkv"])
        grads["qkv"] @ w["qkv"]
        F.linear(x, w["o"])
        grads["o"] @ w["o"]
        F.linear(x, w["gate_up"])
        grads["gate_up"] @ w["gate_up"]
        F.linear(xi, w["down"])
        grads["down"] @ w["down"]


def reference(a: torch.Tensor, b: torch.Tensor) -> None:
    for _ in range(20):
        a @ b


def product_rates(rows_list: list[int], layers: int, rounds: int) -> list[list[str]]:
    gen = torch.Generator().manual_seed(0)
    ws = layer_weights(layers, gen)
    ref_a, ref_b = torch.randn(1024, HIDDEN, generator=gen), torch.randn(HIDDEN, INTERMEDIATE, generator=gen)
    table = []
    for rows in rows_list:
        x, xi = torch.randn(rows, HIDDEN, generator=gen), torch.randn(rows, INTERMEDIATE, generator=gen)
        grads = {name: torch.randn(rows, w.shape[0], generator=gen) for name, w in ws[0].items()}
        variants = {
            "separate": lambda: separate(ws, x, xi, grads),
            "fused": lambda: fused(ws, x, xi, grads),
            "reference": lambda: reference(ref_a, ref_b),
        }
        times = {k: [] for k in variants}
        for r in range(rounds + 1):  # round 0 warms up and is dropped
            for name, run in variants.items() if r % 2 == 0 else reversed(list(variants.items())):
                start = time.process_time()
                run()
                if r:
                    times[name].append(time.process_time() - start)
        flops = layers * layer_flops(rows)
        rate = {k: flops / statistics.median(v) / 1e9 for k, v in times.items() if k != "reference"}
        ref = 20 * 2 * 1024 * HIDDEN * INTERMEDIATE / statistics.median(times["reference"]) / 1e9
        ratio = statistics.median(f / s for f, s in zip(times["fused"], times["separate"]))
        table.append(
            [
                str(rows),
                f"{rate['separate']:.1f}",
                f"{rate['fused']:.1f}",
                f"{ratio:.3f}",
                f"{ref:.1f}",
                f"{100 * rate['separate'] / ref:.0f}%",
            ]
        )
    return table


def profile_step(tasks: int) -> None:
    import multitask
    from common import build_model
    from torch.profiler import ProfilerActivity, profile

    from workers.trainer import MultiTaskTrainer

    work = Path(tempfile.mkdtemp(prefix="prefixd-profile-"))
    model = build_model(False)
    tok = multitask.word_tokenizer(model.config.vocab_size)
    paths = multitask.write_tasks(work / "data", tasks, 32, 64, model.config.vocab_size)
    trainer = MultiTaskTrainer(model, tok, micro_batch_size=4, compile_layers=True, data_cache_dir=str(work / "cache"))
    for i, path in enumerate(paths):
        trainer.add_task(multitask.task_config(path, i, 64, work / "out"))
    trainer.step()
    trainer.step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        trainer.step()
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events)
    products = [e for e in events if e.key in ("aten::mm", "aten::bmm")]
    rows = []
    for e in sorted(products, key=lambda e: -e.self_cpu_time_total)[:10]:
        a, b = e.input_shapes[0], e.input_shapes[1]
        batch = a[0] if len(a) == 3 else 1
        flops = 2 * batch * a[-2] * a[-1] * b[-1] * e.count
        rows.append(
            [
                e.key,
                f"{list(a)} @ {list(b)}",
                str(e.count),
                f"{100 * e.self_cpu_time_total / total:.1f}%",
                f"{flops / (e.self_cpu_time_total / 1e6) / 1e9:.1f}",
            ]
        )
    share = sum(e.self_cpu_time_total for e in products if e.key == "aten::mm") / total
    print(
        f"\none {tasks}-task step, 4-row micro-batches, compiled layers: matrix products (aten::mm) "
        f"{100 * share:.1f}% of self CPU time"
    )
    print(format_table(["op", "shapes", "calls", "of step", "GFLOP/s"], rows))
    graphs = sum(e.self_cpu_time_total for e in events if e.key.startswith("## Call CompiledFxGraph")) / total
    batched = sum(e.self_cpu_time_total for e in events if e.key == "aten::bmm") / total
    print(
        f"the rest: the compiled graphs' own kernels (fused elementwise loops, softmax, cross-entropy) "
        f"{100 * graphs:.1f}%, batched matmuls (attention) {100 * batched:.1f}%, "
        f"everything else (eager ops, autograd and dispatch) {100 * (1 - share - graphs - batched):.1f}%"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30, help="separate layers' weights (default 30, SmolLM2)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (default 7)")
    parser.add_argument("--profile-step", action="store_true", help="also profile one 16-task training step")
    parser.add_argument("--quick", action="store_true", help="4 layers, 3 rounds, 256 and 512 rows")
    args = parser.parse_args(argv)
    if args.layers < 1 or args.rounds < 1:
        parser.error("--layers and --rounds must be >= 1")
    torch.set_num_threads(1)
    allocator.retain_freed_memory()  # as a training worker does: freed outputs are reused, not faulted back in
    layers, rounds = (4, 3) if args.quick else (args.layers, args.rounds)
    rows_list = [256, 512] if args.quick else [256, 512, 1024]
    print(
        f"fp32 projections of {layers} SmolLM2-shaped layers, forward + activation gradient, 1 thread, CPU time, "
        f"median of {rounds} rounds"
    )
    print(
        format_table(
            [
                "rows",
                "separate GFLOP/s",
                "fused GFLOP/s",
                "fused / separate time",
                "reference GFLOP/s",
                "separate / reference",
            ],
            product_rates(rows_list, layers, rounds),
        )
    )
    if args.profile_step:
        profile_step(16)


if __name__ == "__main__":
    main()
