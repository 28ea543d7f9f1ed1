"""What both benchmarks share: the model shapes, interleaved timing, medians and the PASS/MISS table.

Timing on a shared machine: each variant runs once per round, the order rotating from round to round
(A B C, B C A, C A B, ...), so slow spells caused by other processes land on every variant alike. A
comparison is the median over rounds of the per-round ratio X_r / Y_r, which cancels drift between rounds;
the spread (interquartile range of those per-round ratios) says how much to trust a ratio near a target.

Two clocks are read around every call: wall time, and this process's CPU time. With one torch thread the
CPU time leaves out the time the process sat waiting for a core while other processes ran, which is most
of the noise on a shared machine, so results are judged on it ("cpu" clock); with several threads, idle
spinning threads count as CPU time too, and results are judged on wall time. Both are always reported.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(ROOT))

# torch and transformers are imported inside the functions that need them, so a parent process that only
# starts workers and prints their results starts in a fraction of a second.

SMOLLM2_VOCAB = 49152
LLAMA_1B_VOCAB = 32000
TINY_VOCAB = 512


def smollm2_config():
    """SmolLM2-135M's architecture (weights are not needed for speed): 134.5M parameters, embeddings tied."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=SMOLLM2_VOCAB,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )


def llama_1b_config():
    """A ~1B-parameter Llama (random weights; the shape only): hidden 2048, 16 layers, 32 query / 8 key-value
    heads (head_dim 64), MLP 8192, vocab 32,000, embeddings tied: 1.04B parameters (973M in the layers).
    Llama-3.2-1B's layer shape with a 32k vocabulary."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=LLAMA_1B_VOCAB,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )


SHAPES = {"smollm2": smollm2_config, "llama-1b": llama_1b_config}
"""--shape choices: name -> config function (`--tiny` overrides with `tiny_config`)."""


def tiny_config():
    """A 2-layer grouped-query Llama for smoke tests (same code paths, seconds instead of minutes)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=True,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )


def build_model(tiny: bool, seed: int = 0, *, shape: str = "smollm2", dtype: str = "float32", device: str = "cpu"):
    """A randomly initialised causal LM of the chosen shape (`tiny`, else SHAPES[shape]) in `dtype`
    ("float32" or "bfloat16") on `device`, in eval mode (no dropout).

    Initialised the way Llama's `_init_weights` does (normal(0, initializer_range) weights, unit norms) in
    one pass: transformers' own init, after torch's default init, takes ~8 s for the SmolLM2 shape on one
    loaded core; this takes ~2 s, which matters for the short runs that build the model per subprocess.
    On a GPU the weights are created and initialised there (a 1B model never passes through the CPU).
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    if not tiny and shape not in SHAPES:
        raise ValueError(f"shape {shape!r}; accepted: {', '.join(SHAPES)}")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype {dtype!r}; accepted: float32, bfloat16")
    config = tiny_config() if tiny else SHAPES[shape]()
    with no_init_weights(), torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.tie_weights()  # skipped with init_weights: the LM head must be the embedding (134.5M, not 162.8M)
    if config.tie_word_embeddings and model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise RuntimeError("build_model: the LM head is not tied to the embedding")
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():  # the tied embedding appears once
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.normal_(0.0, config.initializer_range, generator=gen)
    return model.eval()


def model_name(tiny: bool, shape: str = "smollm2") -> str:
    if tiny:
        return "tiny Llama (2 layers, width 64)"
    return {
        "smollm2": "SmolLM2-135M-shaped Llama (random weights)",
        "llama-1b": "1B Llama (16 layers, width 2048, 32/8 heads, vocab 32k; random weights)",
    }[shape]


def vocab_size(tiny: bool, shape: str = "smollm2") -> int:
    return TINY_VOCAB if tiny else {"smollm2": SMOLLM2_VOCAB, "llama-1b": LLAMA_1B_VOCAB}[shape]


@dataclass
class Timer:
    """Wall and process-CPU seconds of each timed call, in order."""

    wall: list[float]
    cpu: list[float]

    @classmethod
    def empty(cls) -> Timer:
        return cls([], [])

    def measure(self, fn: Callable[[], object]):
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        self.cpu.append(time.process_time() - cpu)
        self.wall.append(time.perf_counter() - wall)
        return out

    def on(self, clock: str) -> list[float]:
        return self.cpu if clock == "cpu" else self.wall


def choose_clock(clock: str, threads: int) -> str:
    """'auto' -> 'cpu' with one thread, 'wall' with several (see the module docstring)."""
    if clock == "auto":
        return "cpu" if threads == 1 else "wall"
    return clock


def interleaved(variants: dict[str, Callable[[], None]], repeats: int, warmup: int = 1) -> dict[str, Timer]:
    """Seconds per call of each variant, `repeats` rounds after `warmup` untimed rounds.

    Round r runs the variants in the order rotated by r, so every variant takes every slot equally often.
    Returns {name: Timer}, whose lists are indexed by round, so ratios can be paired.
    """
    names = list(variants)
    timers = {n: Timer.empty() for n in names}
    for r in range(warmup + repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            if r < warmup:
                variants[name]()
            else:
                timers[name].measure(variants[name])
    return timers


def paired_ratio(num: list[float], den: list[float]) -> tuple[float, float]:
    """(median of the per-round ratios num_r / den_r, interquartile range of those ratios)."""
    ratios = sorted(a / b for a, b in zip(num, den))
    return statistics.median(ratios), iqr(ratios)


def iqr(values: list[float]) -> float:
    if len(values) < 4:
        return max(values) - min(values) if values else 0.0
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass(frozen=True)
class Target:
    """One target line: `value` compared with `bound` by `op` ('<=' or '>=')."""

    name: str
    value: float
    op: str
    bound: float

    @property
    def passed(self) -> bool:
        return self.value <= self.bound if self.op == "<=" else self.value >= self.bound

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "value": self.value,
            "target": f"{self.op} {self.bound:.2f}",
            "result": "PASS" if self.passed else "MISS",
        }


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Left-aligned first column, right-aligned others, two spaces between columns."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = []
    for row in [header] + rows:
        cells = [str(row[0]).ljust(widths[0])] + [str(c).rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def set_threads(threads: int) -> None:
    if threads < 1:
        raise SystemExit(f"--threads {threads}: must be >= 1")
    import torch

    torch.set_num_threads(threads)


def tiny_spec(work: Path, steps: int) -> Path:
    """A job spec file for a tiny model and task written under `work` (the test suite's tiny Llama and its
    'reverse' task): what the smoke runs of sweep.py and estimate.py train."""
    import json

    from tests.tiny import save_tiny_base, write_task

    save_tiny_base(work / "tiny")
    write_task(work / "rev.jsonl", "reverse")
    spec = {
        "name": "rev",
        "base_model": {"path": str(work / "tiny")},
        "data": {"train": "rev.jsonl", "input_column": "input", "target_column": "target", "max_length": 40},
        "training": {"steps": steps, "examples_per_step": 4, "eval_every": steps, "checkpoint_every": steps},
    }
    (work / "rev.yaml").write_text(json.dumps(spec))
    return work / "rev.yaml"
