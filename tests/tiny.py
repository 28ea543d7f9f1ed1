"""Tiny models built from configs (nothing downloaded), one per supported architecture."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    BartConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    T5Config,
)


def peft_reference(test):
    """For a test that runs PEFT itself as the reference: PEFT still hands its prefix to the model as
    `past_key_values=` and reads `is_gradient_checkpointing`, and transformers 5.x warns on both. prefixd's
    own paths use `cache=`; elsewhere the warnings stay visible."""
    for message in ("`past_key_values` is deprecated", "`is_gradient_checkpointing` is deprecated"):
        test = pytest.mark.filterwarnings(f"ignore:{message}:FutureWarning")(test)
    return test


VOCAB = 96


def tiny_config(model_type: str):
    if model_type == "gpt2":
        return GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=128,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            pad_token_id=0,
            eos_token_id=1,
        )
    if model_type == "llama":  # grouped-query: 4 query heads, 2 key/value heads
        return LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
        )
    if model_type == "mistral":  # grouped-query, sliding-window attention (window wider than the tests)
        return MistralConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            sliding_window=64,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
        )
    if model_type == "qwen2":
        return Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
        )
    if model_type == "bart":
        return BartConfig(
            vocab_size=VOCAB,
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=128,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
            decoder_start_token_id=2,
            forced_eos_token_id=None,
        )
    if model_type == "t5":
        return T5Config(
            vocab_size=VOCAB,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            dropout_rate=0.0,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    raise ValueError(model_type)


CAUSAL = ("gpt2", "llama", "mistral", "qwen2")
SEQ2SEQ = ("bart", "t5")
ALL = CAUSAL + SEQ2SEQ


def tiny_model(model_type: str, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    config = tiny_config(model_type)
    cls = AutoModelForSeq2SeqLM if model_type in SEQ2SEQ else AutoModelForCausalLM
    model = cls.from_config(config, dtype=dtype)
    return model.eval()


def char_tokenizer():
    """A character-level tokenizer over VOCAB ids (0 pad, 1 eos, 2 bos, 3 unk), built in memory."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = " abcdefghijklmnopqrstuvwxyz0123456789.,:;!?-=+>|'()"
    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, "<unk>": 3}
    for c in chars:
        vocab[c] = len(vocab)
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>", unk_token="<unk>"
    )


def write_task(path, kind: str, n: int = 60, seed: int = 0):
    """A small JSONL task with one right answer per row: 'reverse', 'double' or 'next'."""
    import json
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            if kind == "reverse":
                word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 6)))
                row = {"input": f"rev {word}=", "target": word[::-1]}
            elif kind == "double":
                x = rng.randint(1, 400)
                row = {"input": f"dbl {x}=", "target": str(2 * x)}
            else:
                word = "".join(rng.choice("abcdefghijklmnopqrstuvwxy") for _ in range(rng.randint(1, 8)))
                row = {"input": f"next {word}:", "target": "".join(chr(ord(c) + 1) for c in word)}
            f.write(json.dumps(row) + "\n")
    return str(path)


def save_tiny_base(folder):
    """A tiny Llama and the character tokenizer saved as a model folder (safetensors), usable as a spec's
    base_model.path; returns the folder."""
    tiny_model("llama").save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def tiny_task(
    name: str,
    data,
    out_dir,
    *,
    prefix_length: int,
    projection_hidden_size: int | None = None,
    task_id: str | None = None,
    eval_generation: dict | None = None,
    early_stopping: dict | None = None,
    metric: str | None = None,
    **training,
):
    """A TaskConfig for tests: a prefix of `prefix_length` tokens (projected through an MLP of
    `projection_hidden_size` units when given), `training` the spec's training fields (spec defaults for the
    rest), `eval_generation` and `early_stopping` those sections' fields, `metric` the registry metric (the
    spec's default when None; its direction derived as the spec does)."""
    from jobs.fields import (
        EarlyStoppingSpec,
        EvalGenerationSpec,
        RegistrySpec,
        TrainingSpec,
        metric_direction,
        spec_default,
    )
    from workers.prefix import PrefixTuningConfig
    from workers.trainer import TaskConfig

    if eval_generation is not None:
        training["eval_generation"] = EvalGenerationSpec(**eval_generation)
    if early_stopping is not None:
        training["early_stopping"] = EarlyStoppingSpec(**early_stopping)
    metric = metric or spec_default(RegistrySpec, "metric")
    return TaskConfig(
        task_id=task_id or name,
        name=name,
        out_dir=str(out_dir),
        data=data,
        prefix=PrefixTuningConfig(
            num_virtual_tokens=prefix_length,
            prefix_projection=projection_hidden_size is not None,
            encoder_hidden_size=projection_hidden_size,
        ),
        training=TrainingSpec(**training),
        metric=metric,
        direction=metric_direction(metric),
    )
