"""Real learning and real generation on the pretrained SmolLM2-135M (CPU, a few minutes in all)."""

import json
import random
import re

import pytest
import torch

from tests.tiny import tiny_task
from workers.data import DataSettings
from workers.formats import load_prefix
from workers.generate import encode_prompt, generate_texts
from workers.inject import PrefixedModel
from workers.trainer import MultiTaskTrainer

pytestmark = pytest.mark.slow

FIRST = [
    "John",
    "Mary",
    "Alice",
    "Bob",
    "Carlos",
    "Diana",
    "Erik",
    "Fatima",
    "George",
    "Hannah",
    "Ivan",
    "Julia",
    "Kenji",
    "Laura",
    "Mohammed",
    "Nina",
    "Oscar",
    "Priya",
    "Quentin",
    "Rosa",
    "Samuel",
    "Tara",
    "Umar",
    "Vera",
]
LAST = [
    "Smith",
    "Garcia",
    "Brown",
    "Miller",
    "Davis",
    "Wilson",
    "Moore",
    "Taylor",
    "Anderson",
    "Thomas",
    "Jackson",
    "White",
    "Harris",
    "Martin",
    "Thompson",
    "Lopez",
    "Lee",
    "Walker",
    "Hall",
    "Young",
    "King",
    "Wright",
]


def write_names(path, target):
    """A formatting task with one right answer per row."""
    rng = random.Random(0)
    pairs = rng.sample([(a, b) for a in FIRST for b in LAST], 300)
    with open(path, "w") as f:
        for a, b in pairs:
            f.write(json.dumps({"first": a, "last": b, "target": target(a, b)}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def trained(smollm2, tmp_path_factory):
    """Two formatting tasks trained together on SmolLM2: 'last, first' and initials."""
    model, tok = smollm2
    tmp = tmp_path_factory.mktemp("smol")
    tasks = {
        "lastfirst": (lambda a, b: f" {b}, {a}", 10),
        "initials": (lambda a, b: f" {a[0]}.{b[0]}.", 6),
    }
    trainer = MultiTaskTrainer(model, tok, micro_batch_size=16)
    before = {}
    for name, (target, p) in tasks.items():
        data = DataSettings(
            train=write_names(tmp / f"{name}.jsonl", target),
            template="first={first} last={last} ->",
            target_column="target",
            max_length=32,
            validation_fraction=0.1,
        )
        cfg = tiny_task(
            name,
            data,
            str(tmp / name),
            prefix_length=p,
            eval_generation=dict(enabled=True, samples=30, max_new_tokens=8),
            learning_rate=3e-2,
            steps=40,
            examples_per_step=8,
            eval_every=20,
            checkpoint_every=1000,
        )
        trainer.add_task(cfg)
        before[name] = trainer.evaluate(name)
    results = {}
    while trainer.active:
        results |= {r.task_id: r for r in trainer.step().finished}
    return before, results


def test_learns_formatting_tasks_on_held_out_rows(trained):
    before, results = trained
    for name, result in results.items():
        assert result.metrics["exact_match"] >= 0.9, (name, result.metrics)
        assert result.metrics["eval_loss"] < before[name]["eval_loss"] / 4, (name, before[name], result.metrics)
        assert before[name]["exact_match"] < 0.5


def test_generation_with_prefix_differs_from_base_and_equals_stepwise_greedy(smollm2, trained):
    model, tok = smollm2
    _, results = trained
    pm = PrefixedModel(model)
    prefix = load_prefix(results["lastfirst"].prefix_dir)[1].prompt_embeddings().detach()
    prompt = "first=Mary last=Wright ->"
    with_prefix = generate_texts(pm, tok, [prefix], [0], [prompt], max_new_tokens=8)[0]
    bare = generate_texts(pm, tok, None, None, [prompt], max_new_tokens=8)[0]
    assert with_prefix != bare, bare

    ids = encode_prompt(tok, prompt, seq2seq=False)
    tokens = []
    with torch.no_grad():
        for _ in range(8):
            seq = torch.tensor([ids + tokens])
            out = pm.forward([prefix], torch.zeros(1, dtype=torch.long), seq, torch.ones_like(seq))
            nxt = int(out.logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            tokens.append(nxt)
    assert tok.decode(tokens, skip_special_tokens=True).strip() == with_prefix


def test_two_prefix_batch_generates_each_row_as_alone(smollm2, trained):
    model, tok = smollm2
    _, results = trained
    pm = PrefixedModel(model)
    prefixes = [load_prefix(results[n].prefix_dir)[1].prompt_embeddings().detach() for n in ("lastfirst", "initials")]
    # names of the task's lists; the pairs may or may not be among the training rows
    prompts = [
        "first=Mary last=Wright ->",
        "first=Ivan last=Lee ->",
        "first=Nina last=Hall ->",
        "first=Oscar last=King ->",
    ]
    owners = [0, 1, 1, 0]
    mixed = generate_texts(pm, tok, prefixes, owners, prompts, max_new_tokens=8)
    alone = [generate_texts(pm, tok, [prefixes[o]], [0], [p], max_new_tokens=8)[0] for p, o in zip(prompts, owners)]
    assert mixed == alone
    # each row follows its own task's format: initials "X.Y.", the other "Last, First"
    assert all(re.fullmatch(r"[A-Z]\.[A-Z]\.", mixed[i]) for i in (1, 2)), mixed
    assert all(re.fullmatch(r"[A-Z][a-z]+, [A-Z][a-z]+", mixed[i]) for i in (0, 3)), mixed
