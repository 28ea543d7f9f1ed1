"""Continuous batching (workers/decode.py) on tiny models: rows with different prefixes joining and leaving
at different steps decode exactly what each gets alone through `generate_texts`.

Run: python -m pytest -q tests/test_decode.py
"""

from __future__ import annotations

import pytest
import torch

from tests.tiny import char_tokenizer, tiny_model
from workers.decode import ContinuousBatcher, Row, Sampling
from workers.generate import encode_prompt, generate_texts
from workers.inject import PrefixedModel

PROMPTS = ["rev abc=", "dbl 12=", "hello there", "x"]


def prefixes_for(prefixed: PrefixedModel, lengths=(3, 5, 8, 4), seed: int = 0) -> list[torch.Tensor]:
    shape = prefixed.shape
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p, shape.num_layers * 2 * shape.token_dim, generator=g) for p in lengths]


def drain(batcher: ContinuousBatcher, waiting: list[Row], joins_per_step: int) -> None:
    """Add `joins_per_step` waiting rows before each step, until every row is done."""
    while waiting or batcher.rows:
        batcher.add(waiting[:joins_per_step])
        del waiting[:joins_per_step]
        batcher.remove([r for r, _ in batcher.step() if r.done])


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("joins_per_step", [1, 3, 16])
def test_mixed_prefixes_joining_mid_batch_equal_each_row_alone(model_type, joins_per_step):
    prefixed, tokenizer = PrefixedModel(tiny_model(model_type)), char_tokenizer()
    prefixes = prefixes_for(prefixed)
    alone = {
        (j, i): generate_texts(prefixed, tokenizer, [p], [0], [prompt], max_new_tokens=10)[0]
        for j, p in enumerate(prefixes)
        for i, prompt in enumerate(PROMPTS)
    }
    batcher = ContinuousBatcher(prefixed, eos_token_id=tokenizer.eos_token_id)
    rows = {
        key: Row(
            prefix=prefixes[key[0]],
            prompt_ids=encode_prompt(tokenizer, PROMPTS[key[1]], seq2seq=False),
            sampling=Sampling(max_tokens=10, temperature=0.0),
        )
        for key in alone
    }
    drain(batcher, list(rows.values()), joins_per_step)
    got = {key: tokenizer.decode(row.tokens, skip_special_tokens=True).strip() for key, row in rows.items()}
    assert got == alone
    assert all(row.finish_reason in ("stop", "length") for row in rows.values())
    assert not batcher.rows and batcher._mask is None  # everything left; nothing kept


def test_bare_rows_and_cache_trimmed_when_rows_leave():
    prefixed, tokenizer = PrefixedModel(tiny_model("llama")), char_tokenizer()
    expected = generate_texts(prefixed, tokenizer, None, None, PROMPTS[:1], max_new_tokens=6)[0]
    batcher = ContinuousBatcher(prefixed, eos_token_id=None)
    long = Row(
        prefix=None,
        prompt_ids=encode_prompt(tokenizer, "a much longer prompt", seq2seq=False),
        sampling=Sampling(max_tokens=2, temperature=0.0),
    )
    short = Row(
        prefix=None,
        prompt_ids=encode_prompt(tokenizer, PROMPTS[0], seq2seq=False),
        sampling=Sampling(max_tokens=6, temperature=0.0),
    )
    batcher.add([long, short])
    width = batcher._mask.shape[1]
    while not long.done:
        batcher.step()
    batcher.remove([long])
    assert batcher._mask.shape[1] < width and bool((batcher._mask.sum(0) > 0).all())  # padding columns cut
    while not short.done:
        batcher.step()
    assert tokenizer.decode(short.tokens, skip_special_tokens=True).strip() == expected


def test_sampling_is_seeded_per_row_and_top_p_keeps_the_nucleus():
    prefixed, tokenizer = PrefixedModel(tiny_model("llama")), char_tokenizer()
    [prefix] = prefixes_for(prefixed, lengths=(4,))
    ids = encode_prompt(tokenizer, PROMPTS[0], seq2seq=False)

    def sample(seed, top_p=1.0, others=0):
        batcher = ContinuousBatcher(prefixed, eos_token_id=None)
        row = Row(
            prefix=prefix, prompt_ids=ids, sampling=Sampling(max_tokens=12, temperature=1.5, top_p=top_p, seed=seed)
        )
        noise = [
            Row(prefix=None, prompt_ids=ids, sampling=Sampling(max_tokens=12, temperature=1.0)) for _ in range(others)
        ]
        drain(batcher, [row, *noise], 8)
        return row.tokens

    assert sample(7) == sample(7, others=3)  # a row's draws do not depend on its neighbours
    assert sample(7) != sample(8)
    greedy = Row(prefix=prefix, prompt_ids=ids, sampling=Sampling(max_tokens=12, temperature=0.0))
    drain(ContinuousBatcher(prefixed), [greedy], 1)
    assert sample(3, top_p=1e-6) == greedy.tokens  # a nucleus of one token is the argmax


def test_encoder_decoder_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="decoder-only"):
        ContinuousBatcher(PrefixedModel(tiny_model("t5")))
