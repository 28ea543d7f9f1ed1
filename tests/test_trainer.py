"""The multi-task trainer on a tiny Llama: co-tenant independence, PEFT equivalence, join/leave, resume."""

import copy
import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import peft
import torch

from tests.tiny import char_tokenizer, peft_reference, tiny_model, tiny_task, write_task
from workers.batches import ExampleStream, collate_causal
from workers.data import DataSettings, load_task_data
from workers.formats import load_prefix
from workers.storage import JobStorage
from workers.trainer import MultiTaskTrainer

TASKS = {  # name: (kind, prefix length, extra settings)
    "rev": ("reverse", 5, dict(learning_rate=3e-2, schedule="cosine", warmup_steps=3)),
    "dbl": ("double", 10, dict(learning_rate=1e-2, projection_hidden_size=24, examples_per_step=3)),
    "nxt": ("next", 20, dict(learning_rate=2e-2, schedule="linear", weight_decay=0.1, max_grad_norm=0.5)),
}


def task_config(tmp_path, name, steps=30, out=None, **over):
    kind, p, extra = TASKS[name]
    data = DataSettings(
        train=write_task(tmp_path / f"{name}.jsonl", kind, seed=len(name)),
        input_column="input",
        target_column="target",
        max_length=40,
    )
    settings = dict(steps=steps, examples_per_step=4, seed=7, eval_every=10, checkpoint_every=5) | extra | over
    return tiny_task(name, data, out or tmp_path / "out" / name, prefix_length=p, task_id=f"job-{name}", **settings)


def trainer(micro_batch_size=5, **kw):
    return MultiTaskTrainer(tiny_model("llama"), char_tokenizer(), micro_batch_size=micro_batch_size, **kw)


def run(tr, until_empty=True, steps=None):
    results = {}
    n = 0
    while tr.active and (steps is None or n < steps):
        for r in tr.step().finished:
            results[r.task_id] = r
        n += 1
    return results


def prefix_tensor(result):
    return load_prefix(result.prefix_dir)[1].prompt_embeddings().detach()


def test_cotenants_train_as_if_alone(tmp_path):
    together = trainer()
    base_before = {k: v.clone() for k, v in together.model.state_dict().items()}
    for name in TASKS:
        together.add_task(task_config(tmp_path, name, out=tmp_path / "together" / name))
    joint = run(together)
    for k, v in together.model.state_dict().items():
        assert torch.equal(v, base_before[k]), f"base weight {k} changed"
    for name in TASKS:
        alone = trainer()
        alone.add_task(task_config(tmp_path, name, out=tmp_path / "alone" / name))
        solo = run(alone)[f"job-{name}"]
        diff = (prefix_tensor(joint[f"job-{name}"]) - prefix_tensor(solo)).abs().max().item()
        assert diff < 1e-5, (name, diff)
        assert solo.steps == 30
        assert abs(joint[f"job-{name}"].metrics["eval_loss"] - solo.metrics["eval_loss"]) < 1e-5


@peft_reference
def test_single_task_matches_plain_peft_loop(tmp_path):
    cfg = task_config(tmp_path, "rev", steps=20, schedule="constant", warmup_steps=0, max_grad_norm=1.0)
    tr = trainer(micro_batch_size=2)  # micro-batching must not change the result
    tr.add_task(cfg)
    init = copy.deepcopy(tr.tasks[cfg.task_id].encoder.state_dict())
    ours = prefix_tensor(run(tr)[cfg.task_id])

    tok = char_tokenizer()
    data = load_task_data(cfg.data, tok)
    model = peft.get_peft_model(
        tiny_model("llama"),
        peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.prefix.num_virtual_tokens),
    )
    encoder = model.prompt_encoder["default"]
    encoder.load_state_dict(init)
    opt = torch.optim.AdamW(encoder.parameters(), lr=cfg.training.learning_rate, weight_decay=cfg.training.weight_decay)
    stream = ExampleStream(len(data.train), seed=cfg.training.seed)
    for _ in range(cfg.training.steps):
        batch = collate_causal(
            [data.train[i] for i in stream.next_indices(cfg.training.examples_per_step)], tok.pad_token_id
        )
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), cfg.training.max_grad_norm)
        opt.step()
        opt.zero_grad()
    ref = encoder.embedding.weight.detach()
    assert (ours - ref).abs().max().item() < 1e-4


def test_task_joining_at_step_10_trains_as_alone(tmp_path):
    tr = trainer()
    tr.add_task(task_config(tmp_path, "rev", out=tmp_path / "a" / "rev"))
    results = run(tr, steps=10)
    tr.add_task(task_config(tmp_path, "nxt", out=tmp_path / "a" / "nxt"))
    results |= run(tr)
    assert set(results) == {"job-rev", "job-nxt"}
    for name in ("rev", "nxt"):
        alone = trainer()
        alone.add_task(task_config(tmp_path, name, out=tmp_path / "b" / name))
        solo = run(alone)[f"job-{name}"]
        assert (prefix_tensor(results[f"job-{name}"]) - prefix_tensor(solo)).abs().max() < 1e-5


def test_leaving_task_does_not_disturb_the_others(tmp_path):
    tr = trainer()
    tr.add_task(task_config(tmp_path, "rev", out=tmp_path / "a" / "rev", steps=12))
    tr.add_task(task_config(tmp_path, "dbl", out=tmp_path / "a" / "dbl", steps=12))
    run(tr, steps=6)
    tr.remove_task("job-dbl")  # cancelled at a step boundary
    rev = run(tr)["job-rev"]
    alone = trainer()
    alone.add_task(task_config(tmp_path, "rev", out=tmp_path / "b" / "rev", steps=12))
    assert (prefix_tensor(rev) - prefix_tensor(run(alone)["job-rev"])).abs().max() < 1e-5


def test_resume_in_process_is_exact(tmp_path):
    uninterrupted = trainer()
    for name in ("rev", "dbl"):
        uninterrupted.add_task(task_config(tmp_path, name, out=tmp_path / "u" / name))
    expected = run(uninterrupted)

    first = trainer()
    for name in ("rev", "dbl"):
        first.add_task(task_config(tmp_path, name, out=tmp_path / "r" / name))
    run(first, steps=15)  # checkpoint_every=5: a checkpoint at step 15
    del first
    second = trainer()
    for name in ("rev", "dbl"):
        progress = second.add_task(task_config(tmp_path, name, out=tmp_path / "r" / name))
        assert progress.step == 15
    resumed = run(second)
    for tid in expected:
        assert (prefix_tensor(resumed[tid]) - prefix_tensor(expected[tid])).abs().max() < 1e-6


WORKER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from tests.test_trainer import task_config, trainer
    from pathlib import Path
    tmp = Path({tmp!r})
    tr = trainer()
    for name in ("rev", "nxt"):
        tr.add_task(task_config(tmp, name, out=tmp / "k" / name))
    while tr.active:
        report = tr.step()
        step = next(iter(report.progress.values())).step
        print("step", step, flush=True)
        if {stop_after} and step >= {stop_after}:
            time.sleep(60)  # wait to be killed
""")


def test_resume_after_kill_is_exact(tmp_path):
    root = str(Path(__file__).resolve().parents[1])
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=root, tmp=str(tmp_path), stop_after=15))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.strip() == "step 15":
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    [newest, _] = JobStorage.open(tmp_path / "k" / "rev").complete_checkpoints()  # step 15, and step 10
    assert newest.startswith("step-000000015-")

    resumed = trainer()
    for name in ("rev", "nxt"):
        assert resumed.add_task(task_config(tmp_path, name, out=tmp_path / "k" / name)).step == 15
    got = run(resumed)
    ref = trainer()
    for name in ("rev", "nxt"):
        ref.add_task(task_config(tmp_path, name, out=tmp_path / "ref" / name))
    expected = run(ref)
    for tid in expected:
        assert (prefix_tensor(got[tid]) - prefix_tensor(expected[tid])).abs().max() < 1e-6


def test_results_on_disk_and_generation_eval(tmp_path):
    tr = trainer()
    tr.add_task(task_config(tmp_path, "rev", steps=6, eval_generation=dict(enabled=True, samples=4, max_new_tokens=8)))
    result = run(tr)["job-rev"]
    out = Path(result.prefix_dir).parent
    for name in (
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "prefix/prefix_config.json",
        "history.jsonl",
        "metrics.json",
        "data_report.txt",
    ):
        assert (out / name).is_file(), name
    assert not (out / "checkpoints").exists()
    assert set(result.metrics) >= {"eval_loss", "eval_perplexity", "exact_match", "bleu", "rouge_l"}
    lines = (out / "history.jsonl").read_text().splitlines()
    assert len(lines) == 6


def test_epoch_budget_and_checkpointing_option(tmp_path):
    tr = trainer(checkpointing=True)
    cfg = task_config(tmp_path, "rev", steps=None, epochs=0.5)
    progress = tr.add_task(cfg)
    n_train = len(tr.tasks[cfg.task_id].data.train)
    assert progress.total_steps == -(-n_train // 8)  # ceil(0.5 epochs * n / 4 examples per step)
    assert run(tr)[cfg.task_id].steps == progress.total_steps


def test_each_task_steps_after_its_last_micro_batch(tmp_path):
    """A task's optimizer steps, and its gradient is freed, as soon as its last micro-batch is done: with
    rows of one length (so each task's rows stay together) and one task per micro-batch, an update never
    finds another task's gradient. Results are unchanged (test_cotenants_train_as_if_alone)."""
    import json

    tr = trainer(micro_batch_size=4)
    for t in range(4):
        path = tmp_path / f"fixed{t}.jsonl"
        path.write_text(
            "".join(json.dumps({"input": f"{t}{i:03d}", "target": f"{i:03d}{t}"}) + "\n" for i in range(20))
        )
        data = DataSettings(train=str(path), input_column="input", target_column="target", max_length=40)
        tr.add_task(
            tiny_task(f"fixed{t}", data, tmp_path / f"o{t}", prefix_length=10, steps=2, examples_per_step=4, seed=t)
        )
    holding = []
    update = tr._update

    def counting_update(task):
        holding.append(sum(p.grad is not None for t in tr.tasks.values() for p in t.encoder.parameters()))
        update(task)
        assert all(p.grad is None for p in task.encoder.parameters())

    tr._update = counting_update
    tr.step()
    assert holding == [1, 1, 1, 1]


def test_a_task_that_diverges_fails_alone(tmp_path):
    """A task whose prefix goes non-finite mid-run (here: poisoned after step 4) fails in that step with
    the reason, and is removed; the co-tenants finish with the prefixes they get without it."""
    alone = trainer()
    for name in ("rev", "nxt"):
        alone.add_task(task_config(tmp_path, name, steps=12, out=tmp_path / "alone" / name))
    expected = run(alone)

    mixed = trainer()
    for name in ("rev", "dbl", "nxt"):
        mixed.add_task(task_config(tmp_path, name, steps=12, out=tmp_path / "mixed" / name))
    run(mixed, steps=4)
    with torch.no_grad():
        next(mixed.tasks["job-dbl"].encoder.parameters()).fill_(float("nan"))
    report = mixed.step()
    assert set(report.failed) == {"job-dbl"} and "not finite" in report.failed["job-dbl"], report.failed
    assert "at step 5" in report.failed["job-dbl"]
    assert mixed.active == ["job-rev", "job-nxt"] and set(report.progress) == {"job-rev", "job-nxt"}
    got = run(mixed)
    for task_id, result in expected.items():
        diff = (prefix_tensor(got[task_id]) - prefix_tensor(result)).abs().max().item()
        assert diff < 1e-5, (task_id, diff)


def test_a_task_whose_rows_cannot_be_read_fails_alone(tmp_path):
    tr = trainer()
    for name in ("rev", "nxt"):
        tr.add_task(task_config(tmp_path, name, steps=6, out=tmp_path / "out" / name))

    class Unreadable:
        def __getitem__(self, i):
            raise OSError(5, "Input/output error")

    task = tr.tasks["job-nxt"]
    task.data = dataclasses.replace(task.data, train=Unreadable())  # its storage fails under it mid-job
    report = tr.step()
    assert report.failed == {"job-nxt": "cannot read its training rows: OSError: [Errno 5] Input/output error"}
    assert tr.active == ["job-rev"] and report.progress["job-rev"].step == 1
    assert len(run(tr)) == 1
