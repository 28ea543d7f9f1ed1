"""The architecture table, PrefixTuningConfig / PrefixEncoder compatibility with PEFT, and refusals."""

import peft
import pytest
import torch
from transformers import GPT2Config

from tests.tiny import ALL, tiny_config
from workers.arch import ARCHS, UnsupportedModel, prefix_shape
from workers.prefix import PrefixConfigError, PrefixEncoder, PrefixTuningConfig, configure_for_model

# (layers, kv heads, head dim, token_dim, submodules, context) per tiny config: one row per architecture
EXPECTED = {
    "gpt2": (2, 4, 8, 32, 1, 128),
    "llama": (2, 2, 8, 16, 1, 128),
    "mistral": (2, 2, 8, 16, 1, 128),
    "qwen2": (2, 2, 8, 16, 1, 128),
    "bart": (2, 4, 8, 32, 2, 128),
    "t5": (2, 4, 8, 32, 2, None),
}


@pytest.mark.parametrize("model_type", ALL)
def test_shape_per_architecture_matches_peft(model_type):
    config = tiny_config(model_type)
    shape = prefix_shape(config)
    layers, kv, head_dim, token_dim, sub, context = EXPECTED[model_type]
    assert (
        shape.num_layers,
        shape.num_kv_heads,
        shape.head_dim,
        shape.token_dim,
        shape.num_transformer_submodules,
        shape.context_length,
    ) == (layers, kv, head_dim, token_dim, sub, context)
    filled = configure_for_model(PrefixTuningConfig(num_virtual_tokens=4), config)
    # PEFT's own filling of the same fields
    from peft.utils.other import _prepare_prompt_learning_config

    task = "SEQ_2_SEQ_LM" if sub == 2 else "CAUSAL_LM"
    ref = _prepare_prompt_learning_config(peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=4), config)
    for name in ("num_layers", "token_dim", "num_attention_heads"):
        assert getattr(filled, name) == getattr(ref, name), name
    assert filled.task_type == task


def test_configure_does_not_mutate_the_callers_config():
    cfg = PrefixTuningConfig(num_virtual_tokens=4)
    configure_for_model(cfg, tiny_config("llama"))
    assert cfg.num_layers is None and cfg.token_dim is None


def test_seed_example_runs_and_state_dict_keys_equal_peft():
    config = PrefixTuningConfig(
        peft_type="PREFIX_TUNING",
        task_type="SEQ_2_SEQ_LM",
        num_virtual_tokens=20,
        token_dim=768,
        num_transformer_submodules=1,
        num_attention_heads=12,
        num_layers=12,
        encoder_hidden_size=768,
    )
    encoder = PrefixEncoder(config)
    out = encoder(torch.arange(20).unsqueeze(0).expand(3, -1))
    assert out.shape == (3, 20, 2 * 12 * 768)
    for proj in (False, True):
        ours = PrefixEncoder(
            PrefixTuningConfig(
                num_virtual_tokens=5,
                token_dim=16,
                num_layers=2,
                num_attention_heads=2,
                encoder_hidden_size=8,
                prefix_projection=proj,
            )
        )
        theirs = peft.PrefixEncoder(
            peft.PrefixTuningConfig(
                num_virtual_tokens=5,
                token_dim=16,
                num_layers=2,
                num_attention_heads=2,
                encoder_hidden_size=8,
                prefix_projection=proj,
            )
        )
        assert {k: v.shape for k, v in ours.state_dict().items()} == {
            k: v.shape for k, v in theirs.state_dict().items()
        }
        theirs.load_state_dict(ours.state_dict())
        tokens = torch.arange(5).unsqueeze(0)
        assert torch.equal(ours(tokens), theirs(tokens))
        assert hasattr(ours, "transform") == proj and ours.prefix_projection == proj


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(num_layers=3), r"num_layers: 3 does not match the model \(llama: 2\)"),
        (dict(token_dim=32), r"token_dim: 32 does not match the model \(llama: 16\)"),
        (dict(num_attention_heads=4), r"num_attention_heads: 4 does not match the model \(llama: 2\)"),
        (dict(task_type="SEQ_2_SEQ_LM"), r"task_type: 'SEQ_2_SEQ_LM' does not match the model"),
        (dict(num_virtual_tokens=128), r"num_virtual_tokens: 128 .* does not fit the model's context of 128 tokens"),
    ],
)
def test_config_that_does_not_match_the_model(fields, message):
    cfg = PrefixTuningConfig(**({"num_virtual_tokens": 4} | fields))
    with pytest.raises(PrefixConfigError, match=message):
        configure_for_model(cfg, tiny_config("llama"))


def test_every_mismatch_reported_at_once():
    with pytest.raises(PrefixConfigError) as e:
        configure_for_model(PrefixTuningConfig(num_virtual_tokens=4, num_layers=9, token_dim=7), tiny_config("llama"))
    assert "num_layers" in str(e.value) and "token_dim" in str(e.value)


def test_prefix_plus_input_beyond_context():
    with pytest.raises(PrefixConfigError, match=r"\(\+100 tokens of input\)"):
        configure_for_model(PrefixTuningConfig(num_virtual_tokens=40), tiny_config("gpt2"), max_new_tokens=100)


@pytest.mark.parametrize("value", [0, -3, 2.5])
def test_num_virtual_tokens_must_be_positive_integer(value):
    with pytest.raises(PrefixConfigError, match="num_virtual_tokens: .* must be an integer >= 1"):
        PrefixTuningConfig(num_virtual_tokens=value)


def test_bad_enums_name_the_accepted_values():
    with pytest.raises(PrefixConfigError, match="task_type: 'TOKEN_CLS'; accepted: CAUSAL_LM, SEQ_2_SEQ_LM"):
        PrefixTuningConfig(task_type="TOKEN_CLS")
    with pytest.raises(PrefixConfigError, match="only 'PREFIX_TUNING'"):
        PrefixTuningConfig(peft_type="LORA")


def test_unsupported_architecture_names_the_supported_ones():
    class Config:
        model_type = "mamba"

    with pytest.raises(UnsupportedModel, match="'mamba' is not supported; supported: " + ", ".join(sorted(ARCHS))):
        configure_for_model(PrefixTuningConfig(num_virtual_tokens=4), Config())


def test_encoder_decoder_with_unequal_layers_is_refused():
    config = tiny_config("t5")
    config.num_decoder_layers = 3
    with pytest.raises(UnsupportedModel, match="encoder has 2 layers but the decoder 3"):
        prefix_shape(config)


def test_gpt2_without_context_limit_checks():
    cfg = configure_for_model(PrefixTuningConfig(num_virtual_tokens=10), GPT2Config(n_layer=2, n_embd=32, n_head=4))
    assert cfg.prefix_width == 2 * 2 * 32
