"""What a prefix costs in one forward+backward, and what mixing prefixes in a batch costs.

    python benchmarks/prefix_overhead.py                  # SmolLM2-shaped, batch 8 x 128: ~5 min of CPU
    python benchmarks/prefix_overhead.py --quick          # batch 2 x 64, 2 rounds: < 60 s
    python benchmarks/prefix_overhead.py --tiny --quick   # 2-layer model: the smoke test

Four variants, each one forward+backward of the same batch through the same frozen base (fp32), timed
interleaved (see benchmarks/common.py):
  plain   no prefix. The base is frozen, so to make backward run through every layer as it does with a
          prefix, the input embeddings are a leaf that requires grad: inputs_embeds =
          embed(input_ids).requires_grad_(). Activation gradients only, no weight gradients, as with a
          prefix. Same loss as prefixd's (mean target-token cross-entropy, labels on the second half).
  shared  prefixd, one P=10 prefix for all rows (PrefixedModel.forward, prefix encoder's output).
  mixed   prefixd, 8 different P=10 prefixes, one per row (8 encoders, each run once per call).
  peft    PEFT 0.21's prefix tuning on the same base object, inputs and prefix weights (checked: same loss).
Comparisons: (a) shared / plain <= 1.10, (b) mixed / shared <= 1.05, (c) shared / peft <= 1.00.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    Target,
    build_model,
    choose_clock,
    format_table,
    interleaved,
    model_name,
    paired_ratio,
    set_threads,
)

PREFIX_LEN = 10
NUM_PREFIXES = 8
COMPARISONS = [  # (label, numerator, denominator, bound)
    ("(a) prefix P=10 / no prefix", "shared", "plain", 1.10),
    ("(b) mixed prefixes / 1 shared", "mixed", "shared", 1.05),
    ("(c) prefixd / PEFT", "shared", "peft", 1.00),
]


def mean_target_loss(logits, labels):
    """prefixd's causal loss (workers/inject.py): logits [B, T, V], labels [B, T] shifted left; the mean
    over target tokens."""
    import torch.nn.functional as F

    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    mask = targets != -100
    token_loss = F.cross_entropy(logits.flatten(0, 1), targets.clamp(min=0).flatten(), reduction="none")
    return (token_loss.view(targets.shape) * mask).sum() / mask.sum()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 10; --quick 2)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: steadier on a shared machine; use all cores on an idle one)",
    )
    parser.add_argument(
        "--clock",
        choices=("auto", "cpu", "wall"),
        default="auto",
        help="clock the results are judged on (default auto: cpu with 1 thread, else wall)",
    )
    parser.add_argument("--batch", type=int, default=None, help="rows per batch (default 8; --quick 2)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per row (default 128; --quick 64)")
    parser.add_argument("--quick", action="store_true", help="small batch, 2 rounds: under a minute")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model instead of the SmolLM2 shape")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 10)
    batch = args.batch or (2 if args.quick else 8)
    seq_len = args.seq_len or (64 if args.quick else 128)
    if batch < NUM_PREFIXES and not args.quick:
        parser.error(f"--batch {batch}: needs at least {NUM_PREFIXES} rows for the mixed-prefix batch")
    set_threads(args.threads)
    import peft
    import torch

    from workers.inject import PrefixedModel
    from workers.prefix import PrefixEncoder, PrefixTuningConfig, configure_for_model

    warnings.filterwarnings("ignore")  # PEFT's `past_key_values` FutureWarning on every call

    model = build_model(args.tiny)
    prefixed = PrefixedModel(model)  # freezes the base
    n_params = sum(p.numel() for p in model.parameters())
    pcfg = configure_for_model(PrefixTuningConfig(num_virtual_tokens=PREFIX_LEN), model.config)
    torch.manual_seed(1)
    encoders = [PrefixEncoder(pcfg) for _ in range(NUM_PREFIXES)]
    peft_model = peft.get_peft_model(
        model, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=PREFIX_LEN)
    )
    peft_encoder = peft_model.prompt_encoder["default"]
    peft_encoder.load_state_dict(encoders[0].state_dict())  # same keys as PEFT's

    # One batch for every variant: random ids, labels on the second half of each row.
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, model.config.vocab_size, (batch, seq_len), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.clone()
    labels[:, : seq_len // 2] = -100
    one_prefix_rows = torch.zeros(batch, dtype=torch.long)
    n_mixed = min(batch, NUM_PREFIXES)  # --quick's batch of 2 mixes 2 prefixes
    mixed_rows = torch.arange(batch) % n_mixed
    embed = model.get_input_embeddings()
    variants = {
        "plain": "no prefix (inputs_embeds requires grad)",
        "shared": f"prefixd, 1 shared prefix P={PREFIX_LEN}",
        "mixed": f"prefixd, {n_mixed} prefixes, one per row",
        "peft": f"PEFT {peft.__version__} prefix P={PREFIX_LEN}",
    }

    def clear_grads():
        for module in encoders + [peft_encoder]:
            for p in module.parameters():
                p.grad = None

    def plain():
        clear_grads()
        inputs_embeds = embed(input_ids).detach().requires_grad_()  # [B, T, hidden]: backward runs to layer 0
        logits = model(inputs_embeds=inputs_embeds, attention_mask=attention_mask).logits
        mean_target_loss(logits, labels).backward()

    def ours(prefix_encoders, rows):
        clear_grads()
        out = prefixed.forward(
            [e.prompt_embeddings() for e in prefix_encoders], rows, input_ids, attention_mask, labels
        )
        loss = out.token_loss.sum() / out.target_mask.sum()
        loss.backward()
        return loss

    def with_peft():
        clear_grads()
        loss = peft_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        return loss

    # Same inputs and weights: prefixd and PEFT must give the same loss and prefix gradient.
    loss_ours = ours(encoders[:1], one_prefix_rows).item()
    grad_ours = encoders[0].embedding.weight.grad.clone()
    loss_peft = with_peft().item()
    grad_peft = peft_encoder.embedding.weight.grad.clone()
    checks = {
        "loss_prefixd": loss_ours,
        "loss_peft": loss_peft,
        "loss_abs_diff": abs(loss_ours - loss_peft),
        "prefix_grad_max_abs_diff": (grad_ours - grad_peft).abs().max().item(),
    }

    fns = {
        "plain": plain,
        "shared": lambda: ours(encoders[:1], one_prefix_rows),
        "mixed": lambda: ours(encoders[:n_mixed], mixed_rows),
        "peft": with_peft,
    }
    timers = interleaved(fns, repeats=repeats, warmup=1)
    clock = choose_clock(args.clock, args.threads)

    median = {c: {k: statistics.median(t.on(c)) for k, t in timers.items()} for c in ("cpu", "wall")}
    results = []
    for label, num, den, bound in COMPARISONS:
        ratio = {c: paired_ratio(timers[num].on(c), timers[den].on(c)) for c in ("cpu", "wall")}
        target = Target(label, ratio[clock][0], "<=", bound)
        results.append(
            target.as_dict()
            | {
                "clock": clock,
                "ratio_iqr": ratio[clock][1],
                "cpu_ratio": ratio["cpu"][0],
                "cpu_ratio_iqr": ratio["cpu"][1],
                "wall_ratio": ratio["wall"][0],
                "wall_ratio_iqr": ratio["wall"][1],
            }
        )

    tokens = batch * seq_len
    print(
        f"prefix_overhead: {model_name(args.tiny)}, {n_params / 1e6:.1f}M parameters, fp32, "
        f"batch {batch} x {seq_len}, threads {args.threads}, {repeats} interleaved rounds (+1 warm-up)"
    )
    print(
        "no-prefix baseline: inputs_embeds = embed(ids).requires_grad_(), so backward runs through every "
        "layer (activation gradients only, frozen weights get none), same loss"
    )
    print(
        f"check: prefixd vs PEFT on the same weights: loss {loss_ours:.6f} vs {loss_peft:.6f} "
        f"(|diff| {checks['loss_abs_diff']:.1e}), prefix gradient max |diff| "
        f"{checks['prefix_grad_max_abs_diff']:.1e}"
    )
    print()
    rows = [
        [
            f"{name}: {variants[name]}",
            f"{median['cpu'][name]:.3f}",
            f"{median['wall'][name]:.3f}",
            f"{min(timers[name].wall):.3f}",
            f"{max(timers[name].wall):.3f}",
            f"{tokens / median[clock][name]:.0f}",
        ]
        for name in variants
    ]
    print(
        format_table(
            ["variant (forward+backward)", "cpu s", "wall s", "wall min", "wall max", f"tokens/s ({clock})"], rows
        )
    )
    print()
    rows = [
        [
            r["name"],
            f"{r['cpu_ratio']:.3f}",
            f"{r['cpu_ratio_iqr']:.3f}",
            f"{r['wall_ratio']:.3f}",
            f"{r['wall_ratio_iqr']:.3f}",
            r["target"],
            r["result"],
        ]
        for r in results
    ]
    print(format_table(["comparison (time ratio)", "cpu", "IQR", "wall", "IQR", "target", f"result ({clock})"], rows))
    print(
        "times: medians over rounds; ratio: median over rounds of the per-round time ratio, IQR its "
        "interquartile range (noise); cpu: this process's CPU time (excludes waiting for a core)"
    )

    report = {
        "benchmark": "prefix_overhead",
        "config": {
            "model": model_name(args.tiny),
            "parameters": n_params,
            "batch": batch,
            "seq_len": seq_len,
            "prefix_len": PREFIX_LEN,
            "num_prefixes": NUM_PREFIXES,
            "threads": args.threads,
            "repeats": repeats,
            "clock": clock,
            "dtype": "float32",
            "torch": torch.__version__,
            "peft": peft.__version__,
        },
        "variants": variants,
        "times_s": {c: {k: t.on(c) for k, t in timers.items()} for c in ("cpu", "wall")},
        "median_s": median,
        "comparisons": results,
        "checks": checks,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
