"""GPT-NeoX architectures and the named presets: the one source of truth for shapes.

Both sides read this module: the runtime builds models from it, the operator plans GPU
memory and validates parallelism with it, and the CRD generator writes the presets'
head counts into the CEL rules. It imports no torch.

Preset values are copied from the published Hugging Face configs:
- Pythia: https://huggingface.co/EleutherAI/pythia-70m/blob/main/config.json (and siblings),
  training recipe from https://github.com/EleutherAI/pythia/tree/main/models
- GPT-NeoX-20B: https://huggingface.co/EleutherAI/gpt-neox-20b/blob/main/config.json,
  recipe from https://github.com/EleutherAI/gpt-neox/blob/main/configs/20B.yml
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

HiddenAct = Literal["gelu", "gelu_fast", "gelu_new"]


class ModelArchitecture(BaseModel):
    """Shape of a GPT-NeoX model; field names follow Hugging Face `GPTNeoXConfig`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    vocab_size: int = Field(gt=0, description="Number of rows of the input and output embeddings.")
    hidden_size: int = Field(gt=0, description="Width of the residual stream.")
    num_hidden_layers: int = Field(gt=0, description="Number of transformer blocks.")
    num_attention_heads: int = Field(gt=0, description="Attention heads per layer.")
    intermediate_size: int = Field(gt=0, description="Width of the MLP's inner layer.")
    rotary_pct: float = Field(gt=0, le=1, description="Fraction of each head's dimensions that get rotary embeddings.")
    rotary_emb_base: float = Field(10000.0, gt=0, description="Base of the rotary frequencies.")
    max_position_embeddings: int = Field(2048, gt=0, description="Longest sequence the model supports.")
    layer_norm_eps: float = Field(1e-5, gt=0, description="Epsilon of every LayerNorm.")
    hidden_act: HiddenAct = Field("gelu", description="MLP activation.")
    use_parallel_residual: bool = Field(True, description="x + attn(ln1(x)) + mlp(ln2(x)) instead of sequential residuals.")
    tie_word_embeddings: bool = Field(False, description="Share the input embedding with the output projection.")

    @model_validator(mode="after")
    def _check_divisibility(self) -> "ModelArchitecture":
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})")
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_ndims(self) -> int:
        """Dimensions of each head that rotate; HF truncates the same way."""
        return int(self.head_dim * self.rotary_pct)

    def num_parameters(self) -> int:
        """Exact parameter count of the model this architecture builds."""
        h, f, v, n = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers
        per_layer = (
            2 * 2 * h  # two LayerNorms, weight + bias
            + h * 3 * h + 3 * h  # fused query_key_value
            + h * h + h  # attention output
            + h * f + f + f * h + h  # MLP
        )
        embeddings = v * h * (1 if self.tie_word_embeddings else 2)
        return n * per_layer + embeddings + 2 * h  # + final LayerNorm

    def to_hf_config(self) -> dict[str, Any]:
        """config.json for `transformers.GPTNeoXConfig`, in the published 4.x key style."""
        return {
            "architectures": ["GPTNeoXForCausalLM"],
            "model_type": "gpt_neox",
            **self.model_dump(),
            "rotary_emb_base": self.rotary_emb_base,
            "use_cache": True,
            "bos_token_id": 0,
            "eos_token_id": 0,
            "torch_dtype": "float32",
            "attention_bias": True,
            "initializer_range": 0.02,
        }

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> "ModelArchitecture":
        """Read a GPT-NeoX config.json in either key style.

        Published 4.x configs say `rotary_pct` / `rotary_emb_base`; newer transformers
        write `partial_rotary_factor` and `rope_theta`, or nest them in `rope_parameters`.
        """
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        rotary_pct = config.get("rotary_pct", config.get("partial_rotary_factor", rope.get("partial_rotary_factor")))
        rotary_base = config.get("rotary_emb_base", config.get("rope_theta", rope.get("rope_theta", 10000.0)))
        if rotary_pct is None:
            rotary_pct = 0.25
        fields = {name: config[name] for name in cls.model_fields if name in config}
        fields.update(rotary_pct=rotary_pct, rotary_emb_base=rotary_base)
        return cls(**fields)


class TrainingRecipe(BaseModel):
    """Published optimisation hyperparameters that go with a preset."""

    model_config = ConfigDict(frozen=True)

    learning_rate: float
    min_learning_rate: float
    warmup_fraction: float = 0.01
    train_steps: int
    global_batch_size: int
    seq_length: int = 2048
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8
    gradient_clipping: float = 1.0
    zero_stage: int = 1
    precision: Literal["fp16", "bf16", "fp32"] = "fp16"


class Preset(BaseModel):
    model_config = ConfigDict(frozen=True)

    architecture: ModelArchitecture
    recipe: TrainingRecipe
    source: str


def _pythia(hidden: int, layers: int, heads: int, lr: float, vocab: int = 50304) -> Preset:
    return Preset(
        architecture=ModelArchitecture(
            vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
            num_attention_heads=heads, intermediate_size=4 * hidden, rotary_pct=0.25,
        ),
        recipe=TrainingRecipe(learning_rate=lr, min_learning_rate=lr * 0.1,
                              train_steps=143_000, global_batch_size=1024),
        source="https://github.com/EleutherAI/pythia/tree/main/models",
    )


PRESETS: dict[str, Preset] = {
    # Tiny shapes for CPU tests and the local demo; trained from scratch in seconds.
    "tiny": Preset(
        architecture=ModelArchitecture(
            vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=256, rotary_pct=0.25, max_position_embeddings=256,
        ),
        recipe=TrainingRecipe(learning_rate=3e-3, min_learning_rate=3e-4, warmup_fraction=0.05,
                              train_steps=200, global_batch_size=8, seq_length=128,
                              zero_stage=0, precision="fp32"),
        source="neox-k8s test shape",
    ),
    "pythia-14m": _pythia(128, 6, 4, 1e-3, vocab=50304),
    "pythia-70m": _pythia(512, 6, 8, 1e-3),
    "pythia-160m": _pythia(768, 12, 12, 6e-4),
    "pythia-410m": _pythia(1024, 24, 16, 3e-4),
    "pythia-1b": _pythia(2048, 16, 8, 3e-4),
    "pythia-1.4b": _pythia(2048, 24, 16, 2e-4),
    "pythia-2.8b": _pythia(2560, 32, 32, 1.6e-4),
    "pythia-6.9b": _pythia(4096, 32, 32, 1.2e-4, vocab=50432),
    "pythia-12b": _pythia(5120, 36, 40, 1.2e-4, vocab=50688),
    "neox-20b": Preset(
        architecture=ModelArchitecture(
            vocab_size=50432, hidden_size=6144, num_hidden_layers=44, num_attention_heads=64,
            intermediate_size=24576, rotary_pct=0.25, hidden_act="gelu_fast",
        ),
        recipe=TrainingRecipe(learning_rate=0.97e-4, min_learning_rate=0.97e-5,
                              train_steps=150_000, global_batch_size=1536, zero_stage=1,
                              precision="fp16"),
        source="https://github.com/EleutherAI/gpt-neox/blob/main/configs/20B.yml",
    ),
}

PRESET_NAMES: tuple[str, ...] = tuple(PRESETS)


def preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESET_NAMES)}") from None
