"""The two compiled-kernel choices of workers/fused.py, each against what it replaced.

    python benchmarks/compiled_kernels.py           # SmolLM2 shapes, 200 rounds: ~20 s on 1 core
    python benchmarks/compiled_kernels.py --quick   # small shapes, 5 rounds: the smoke test

- mask: the compiled layer's attention (`_grouped_attention`: scores, mask, softmax, values) of one
  SmolLM2-shaped layer and 4-row micro-batch (4 rows x 9 query heads over 3 key/value heads x 64 queries x
  74 keys: 10 prefix slots + 64 tokens, head_dim 64), with the model's boolean mask (masked_fill, as before)
  against the additive one `additive_mask` makes (now); the gradient taken is the queries'.
- cross-entropy: the per-token loss over one micro-batch's 128 target tokens x 49,152 vocabulary logits,
  `torch.compile(token_cross_entropy)` (F.cross_entropy, as before) against the compiled
  `fused_token_cross_entropy` (now: the backward written out).
Each is timed forward + backward (the gradient of a weighted sum), both variants alternating within each
round (order reversed every other round), medians of CPU time and the median of per-round ratios, 1 thread,
with freed memory kept in the process as the trainer keeps it (workers/allocator.py). The two variants'
outputs and gradients are compared first.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import format_table  # noqa: E402

from workers import allocator, fused  # noqa: E402


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The compiled layer's attention (`fused._grouped_attention`), with either mask form."""
    return fused._grouped_attention(q, k, v, mask, 0.125)


def attention_case(rows: int, queries: int, prefix: int) -> tuple[dict, tuple]:
    keys = prefix + queries
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(rows, 9, queries, 64, generator=gen)
    k, v = torch.randn(rows, 3, keys, 64, generator=gen), torch.randn(rows, 3, keys, 64, generator=gen)
    keep = torch.ones(rows, 1, queries, keys, dtype=torch.bool)
    keep[..., prefix:] = torch.ones(queries, queries, dtype=torch.bool).tril()
    keep[1, ..., :3] = False  # a row with a shorter prefix
    compiled = torch.compile(attention)
    variants = {
        "boolean mask (before)": (compiled, (k, v, keep)),
        "additive mask (now)": (compiled, (k, v, fused.additive_mask(keep, torch.float32))),
    }
    return variants, (q, torch.randn(q.shape, generator=gen))


def cross_entropy_case(tokens: int, vocab: int) -> tuple[dict, tuple]:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(tokens, vocab, generator=gen) * 3
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    variants = {
        "F.cross_entropy (before)": (torch.compile(fused.token_cross_entropy), (targets,)),
        "written-out backward (now)": (torch.compile(fused.fused_token_cross_entropy), (targets,)),
    }
    return variants, (logits, torch.rand(tokens, generator=gen))


def forward_backward(fn, extra: tuple, inputs: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    x = inputs[0].clone().requires_grad_()
    out = fn(x, *extra)
    (out * inputs[1]).sum().backward()
    return out.detach(), x.grad


def compare(variants: dict, inputs: tuple, rounds: int) -> tuple[list[list[str]], float]:
    """Rows of the table, and the largest difference between the variants' outputs and gradients."""
    (before, b_extra), (now, n_extra) = variants.values()
    diff = max(
        (x - y).abs().max().item()
        for x, y in zip(forward_backward(before, b_extra, inputs), forward_backward(now, n_extra, inputs))
    )
    times = {name: [] for name in variants}
    items = list(variants.items())
    for r in range(rounds + 1):  # round 0 warms up and is dropped
        for name, (fn, extra) in items if r % 2 == 0 else items[::-1]:
            start = time.process_time()
            forward_backward(fn, extra, inputs)
            if r:
                times[name].append(time.process_time() - start)
    old, new = (times[name] for name in variants)
    ratio = statistics.median(n / o for n, o in zip(new, old))
    rows = [[name, f"{1e3 * statistics.median(t):.3f}"] for name, t in times.items()]
    rows[1].append(f"{ratio:.3f}")
    rows[0].append("")
    return rows, diff


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200, help="timed rounds (default 200)")
    parser.add_argument("--quick", action="store_true", help="small shapes, 5 rounds")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    torch.set_num_threads(1)
    allocator.retain_freed_memory()
    rounds = 5 if args.quick else args.rounds
    attention_shape, ce_shape = ((2, 16, 4), (8, 512)) if args.quick else ((4, 64, 10), (128, 49152))
    print(f"compiled kernels, forward + backward, 1 thread, CPU time, {rounds} rounds")
    for title, (variants, inputs) in (
        (
            f"attention, {attention_shape[0]} rows x 9 heads x {attention_shape[1]} queries x "
            f"{attention_shape[1] + attention_shape[2]} keys",
            attention_case(*attention_shape),
        ),
        (f"cross-entropy, {ce_shape[0]} tokens x {ce_shape[1]} vocabulary", cross_entropy_case(*ce_shape)),
    ):
        rows, diff = compare(variants, inputs, rounds)
        print(f"\n{title} (outputs and gradients differ by at most {diff:.1e})")
        print(format_table(["variant", "median ms", "now / before (paired median)"], rows))


if __name__ == "__main__":
    main()
