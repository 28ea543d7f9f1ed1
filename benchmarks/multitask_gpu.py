"""multitask.py on a GPU: N tasks trained jointly by prefixd against the same N tasks trained with PEFT.

    python benchmarks/multitask.py --device cuda --dtype bfloat16 --shape smollm2 --tasks 1,16,64
    python benchmarks/multitask.py --device cuda --dtype bfloat16 --shape llama-1b --tasks 1,16,64

multitask.py calls `main` when its device resolves to CUDA. The tasks, data and variants are multitask.py's
(4 rows x --seq-len tokens per task and step, P = 10, AdamW, clipping at 1.0, random-weight base):
  (a) prefixd: one `MultiTaskTrainer` on the GPU with all N tasks, micro-batches of --micro-batch rows,
      compiled decoder layers unless --eager (Inductor's Triton kernels);
  (b) PEFT, one task after another over the same base object: a fresh PeftModel per task (its creation
      timed apart), the same steps per task, batches moved to the GPU;
  (c) N single-task PEFT processes, memory only: N x (b)'s single-task peak (each would hold its own base).
Everything runs in this one process, on one model: the N values one after another, each with a fresh
trainer whose memory is freed (and checked freed) before the next. Per N: (a) warms up with one step of
as many tasks as fill one micro-batch (compiling the layers on the first N), the other tasks join, then
--steps rounds of one (a) step and the next N task-steps of (b), A B in even rounds and B A in odd ones.

Timing: wall clock (time.perf_counter) between torch.cuda.synchronize() calls, around each (a) step and
each (b) task-step; tokens/s counts every input token. Memory: torch.cuda.max_memory_allocated() after
torch.cuda.reset_peak_memory_stats() before each timed call, the maximum over the variant's calls: the
model, what the variant keeps (its tasks' prefixes and AdamW moments) and the step's transients. During
(a) the (b) task in flight stays allocated (one prefix and its moments: <= 2 MB on llama-1b), and the
reverse; (b)'s single-task peak, the unit of (c), is measured first, before any (a) trainer exists.
TFLOP/s of (a) = 4 x all parameters x tokens/s (multitask.py's nominal count). fp32 runs keep PyTorch's
default (no TF32).

Targets: (a) tokens/s >= 1.5 x (b) at N = 16 (shown at N = 64 against the same bound), and (a) peak
memory <= 1.2 x (a)'s at N = 1 (a single-task prefixd run).

`main` is device-generic so the smoke test runs it on the CPU (`device="cpu"`): then there is nothing to
synchronise and the memory is the process's peak RSS, which cannot be reset: its numbers mean nothing.
"""

from __future__ import annotations

import gc
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    Target,
    build_model,
    format_table,
    model_name,
    peak_rss_bytes,
    vocab_size,
)
from multitask import EXAMPLES_PER_STEP, PREFIX_LEN, ROUNDS, PeftTask, task_config, word_tokenizer, write_tasks  # noqa: E402

TARGET_SPEEDUP = 1.5  # (a) tokens/s >= 1.5 x (b) at N = 16
TARGET_MEMORY = 1.2  # (a) peak memory <= 1.2 x (a) at N = 1
TARGET_NS = (16, 64)
GiB = 2**30


class Device:
    """Synchronisation and peak-memory reads for `device` ('cuda' or, for the smoke test, 'cpu')."""

    def __init__(self, device: str):
        import torch

        self.torch, self.name = torch, device
        self.cuda = device == "cuda"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int:
        return self.torch.cuda.max_memory_allocated() if self.cuda else peak_rss_bytes()

    def allocated(self) -> int:
        return self.torch.cuda.memory_allocated() if self.cuda else 0

    def timed(self, fn):
        """(fn's result, wall seconds, peak memory) with the device idle before and after."""
        self.sync()
        self.reset_peak()
        start = time.perf_counter()
        out = fn()
        self.sync()
        return out, time.perf_counter() - start, self.peak()

    def describe(self) -> str:
        if not self.cuda:
            return "cpu (smoke run: memory is peak RSS)"
        props = self.torch.cuda.get_device_properties(0)
        return f"{props.name}, {props.total_memory / GiB:.0f} GiB, torch {self.torch.__version__}"


def measure(args, ns: list[int], device: str, data_paths: list[str], cache_dir: str, work: Path) -> dict:
    """Run (a) and (b) for every N in `ns` (ascending, 1 first) on one model; returns the raw results."""
    import torch

    from workers.data import DataSettings, load_task_data
    from workers.trainer import MultiTaskTrainer

    dev = Device(device)
    if dev.cuda:
        torch.cuda.set_device(0)
    model = build_model(args.tiny, shape=args.shape, dtype=args.dtype, device=device)
    params = sum(p.numel() for p in model.parameters())
    tok = word_tokenizer(model.config.vocab_size)
    dev.sync()
    base_bytes = dev.allocated()
    raw = {
        "parameters": params,
        "model_bytes": base_bytes,
        "device": dev.describe(),
        "torch": torch.__version__,
        "joint": {},
    }

    # (b)'s unit: one PEFT task alone with the model (warm-up step, then a measured one); also (c)'s unit.
    warnings.filterwarnings("ignore")  # PEFT's `past_key_values` FutureWarning on every call
    settings = DataSettings(train=data_paths[0], input_column="input", target_column="target", max_length=args.seq_len)
    single = PeftTask(
        model,
        load_task_data(settings, tok, cache_dir=cache_dir).train,
        seed=10**6,
        pad_id=tok.pad_token_id,
        device=device,
    )
    single.step()
    _, single_s, single_peak = dev.timed(single.step)
    raw["peft_single"] = {"peak_bytes": single_peak, "step_s": single_s}
    del single
    release(dev)

    for n in ns:
        started = time.perf_counter()
        trainer = MultiTaskTrainer(
            model, tok, micro_batch_size=args.micro_batch, data_cache_dir=cache_dir, compile_layers=not args.eager
        )
        if trainer.compile_note:
            raise SystemExit(f"compiled layers unavailable: {trainer.compile_note}")
        configs = [task_config(p, i, args.seq_len, work / f"out-n{n}") for i, p in enumerate(data_paths[:n])]
        warm = min(n, max(1, args.micro_batch // EXAMPLES_PER_STEP))
        for cfg in configs[:warm]:
            trainer.add_task(cfg)
        _, warmup_s, _ = dev.timed(trainer.step)
        start = time.perf_counter()
        for cfg in configs[warm:]:
            trainer.add_task(cfg)
        add_s = time.perf_counter() - start
        datas = [trainer.tasks[cfg.task_id].data.train for cfg in configs]
        plan = [(i, s) for i in range(n) for s in range(args.steps)]  # (b): one task after another
        r = {
            "n": n,
            "steps": args.steps,
            "a_s": [],
            "a_tokens": [],
            "a_peak_bytes": 0,
            "a_warmup_s": warmup_s,
            "a_add_tasks_s": add_s,
            "b_s": [],
            "b_tokens": [],
            "b_peak_bytes": 0,
            "b_setup_s": 0.0,
        }
        peft_task = None

        def run_a():
            report, seconds, peak = dev.timed(trainer.step)
            r["a_s"].append(seconds)
            r["a_tokens"].append(report.tokens)
            r["a_peak_bytes"] = max(r["a_peak_bytes"], peak)

        def run_b(chunk):
            nonlocal peft_task
            seconds = tokens = 0
            for i, s in chunk:
                if s == 0:  # the next task: a fresh PeftModel over the same base, its creation timed apart
                    start = time.perf_counter()
                    peft_task = PeftTask(model, datas[i], seed=i, pad_id=trainer.pad_id, device=device)
                    r["b_setup_s"] += time.perf_counter() - start
                count, step_s, peak = dev.timed(peft_task.step)
                seconds, tokens = seconds + step_s, tokens + count
                r["b_peak_bytes"] = max(r["b_peak_bytes"], peak)
            r["b_s"].append(seconds)
            r["b_tokens"].append(tokens)

        for k in range(args.steps):
            chunk = plan[k * n : (k + 1) * n]
            if k % 2 == 0:
                run_a()
                run_b(chunk)
            else:
                run_b(chunk)
                run_a()
        r["a_compiled"] = trainer.prefixed.compiled is not None and trainer.prefixed.compiled.calls > 0
        trainer = peft_task = datas = None  # release the device memory before the next N
        r["leftover_bytes"] = release(dev) - base_bytes  # what the N's trainer did not give back (~0)
        raw["joint"][str(n)] = r
        print(f"  N={n}: done ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    return raw


def release(dev: Device) -> int:
    """Free what nothing references any more; the memory still allocated."""
    gc.collect()
    if dev.cuda:
        dev.torch.cuda.empty_cache()
    dev.sync()
    return dev.allocated()


def summarize(raw: dict, n: int) -> dict:
    r, one = raw["joint"][str(n)], raw["joint"]["1"]
    a_rate = sum(r["a_tokens"]) / sum(r["a_s"])
    b_rate = sum(r["b_tokens"]) / sum(r["b_s"])
    return {
        "n": n,
        "steps": r["steps"],
        "a_tokens_per_s": a_rate,
        "b_tokens_per_s": b_rate,
        "speedup_a_over_b": a_rate / b_rate,
        "speedup_by_round": [
            (ta / sa) / (tb / sb) for ta, sa, tb, sb in zip(r["a_tokens"], r["a_s"], r["b_tokens"], r["b_s"])
        ],
        "a_tflops": 4 * raw["parameters"] * a_rate / 1e12,
        "b_tflops": 4 * raw["parameters"] * b_rate / 1e12,
        "a_peak_bytes": r["a_peak_bytes"],
        "b_peak_bytes": r["b_peak_bytes"],
        "a_peak_over_single_task": r["a_peak_bytes"] / one["a_peak_bytes"],
        "c_peak_bytes": n * raw["peft_single"]["peak_bytes"],
        "a_warmup_s": r["a_warmup_s"],
        "a_compiled": r["a_compiled"],
        "leftover_bytes": r["leftover_bytes"],
    }


def main(args, ns: list[int], device: str = "cuda") -> dict:
    """The GPU benchmark (see the module docstring): prints the table and targets, writes --json; returns
    the report {"benchmark", "config", "summary" (one dict per N in `ns`), "targets", "raw"}."""
    steps = args.steps or (1 if args.quick else ROUNDS)
    args.steps = steps
    run_ns = sorted(set(ns) | {1})  # N = 1 is the single-task memory reference
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="prefixd-bench-gpu-") as tmp:
        work = Path(tmp)
        rows = EXAMPLES_PER_STEP * (steps + 2) + 8
        paths = write_tasks(work / "data", max(run_ns), rows, args.seq_len, vocab_size(args.tiny, args.shape))
        raw = measure(args, run_ns, device, paths, str(work / "cache"), work)
    summary = [summarize(raw, n) for n in ns]

    layers = "eager layers" if args.eager else "compiled layers"
    print(
        f"multitask ({device}): {model_name(args.tiny, args.shape)}, {raw['parameters'] / 1e6:.1f}M parameters, "
        f"{args.dtype} base, fp32 prefixes; {raw['device']}"
    )
    print(
        f"per task and step {EXAMPLES_PER_STEP} rows x {args.seq_len} tokens, P={PREFIX_LEN}; prefixd "
        f"micro_batch_size {args.micro_batch}, {layers}; wall time between CUDA synchronisations"
    )
    print(
        "(a) prefixd MultiTaskTrainer, all N tasks jointly   (b) PEFT, one task after another, same process "
        "and base   (c) N single-task PEFT processes (memory: N x (b)'s single-task peak)"
    )
    print()
    rows = [
        [
            str(s["n"]),
            str(s["steps"]),
            f"{s['a_tokens_per_s']:.1f}",
            f"{s['b_tokens_per_s']:.1f}",
            f"{s['speedup_a_over_b']:.3f}",
            f"{s['a_tflops']:.2f}",
            f"{s['a_peak_bytes'] / GiB:.3f}",
            f"{s['b_peak_bytes'] / GiB:.3f}",
            f"{s['c_peak_bytes'] / GiB:.3f}",
            f"{s['a_peak_over_single_task']:.3f}",
        ]
        for s in summary
    ]
    print(
        format_table(
            [
                "N",
                "steps",
                "(a) tok/s",
                "(b) tok/s",
                "a/b",
                "(a) TFLOP/s",
                "(a) peak GiB",
                "(b) peak GiB",
                "(c) peak GiB",
                "(a) peak / N=1",
            ],
            rows,
        )
    )
    print(
        f"model {raw['model_bytes'] / GiB:.3f} GiB on the device; one PEFT task alone peaks at "
        f"{raw['peft_single']['peak_bytes'] / GiB:.3f} GiB"
    )
    print(
        "(a)'s warm-up step (one micro-batch"
        + ("" if args.eager else ", compiling the layers on the first N")
        + "; not in the rates): "
        + ", ".join(f"N={s['n']} {s['a_warmup_s']:.1f} s" for s in summary)
    )
    for s in summary:
        print(f"N={s['n']} a/b by round: " + " ".join(f"{x:.3f}" for x in s["speedup_by_round"]))
    print()

    target_ns = [n for n in ns if n in TARGET_NS] or [max(ns)]
    targets = []
    for s in summary:
        if s["n"] in target_ns:
            targets += [
                Target(f"N={s['n']}: (a) tokens/s / (b) tokens/s", s["speedup_a_over_b"], ">=", TARGET_SPEEDUP),
                Target(
                    f"N={s['n']}: (a) peak memory / single-task run (N=1)",
                    s["a_peak_over_single_task"],
                    "<=",
                    TARGET_MEMORY,
                ),
            ]
    print(
        format_table(
            ["target", "value", "target", "result"],
            [[t.name, f"{t.value:.3f}", t.as_dict()["target"], t.as_dict()["result"]] for t in targets],
        )
    )
    if target_ns != [n for n in TARGET_NS if n in ns]:
        print(f"(the targets are stated for N = 16 (speed) and 16, 64 (memory); none ran, shown for N={target_ns[0]})")
    print(f"total {time.perf_counter() - started:.0f} s")

    report = {
        "benchmark": "multitask",
        "config": {
            "device": device,
            "gpu": raw["device"],
            "model": model_name(args.tiny, args.shape),
            "shape": "tiny" if args.tiny else args.shape,
            "dtype": args.dtype,
            "parameters": raw["parameters"],
            "seq_len": args.seq_len,
            "examples_per_step": EXAMPLES_PER_STEP,
            "prefix_len": PREFIX_LEN,
            "micro_batch_size": args.micro_batch,
            "compiled_layers": not args.eager,
            "tasks": ns,
            "flops_per_token": 4 * raw["parameters"],
            "clock": "wall",
            "torch": raw["torch"],
        },
        "summary": summary,
        "targets": [t.as_dict() for t in targets],
        "raw": raw,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report
