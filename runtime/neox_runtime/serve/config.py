"""The one configuration tree of the server, built once from the CLI and passed down whole."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(kw_only=True)
class EngineConfig:
    """Budgets of the engine; the KV cache is preallocated from them at start."""

    model: Path
    dtype: str = "float32"
    device: str = "cpu"
    tensor_parallel: int = 1
    max_num_seqs: int = 64  # KV-cache slots = most sequences running at once
    max_model_len: int | None = None  # default: min(max_position_embeddings, 2048)
    max_num_batched_tokens: int = 2048  # tokens computed per step (decode rows + prefill chunks)
    kv_cache_bytes: int | None = None  # cap on the cache; fewer slots if it would not fit
    threads: int | None = None  # torch intra-op threads; default: all cores
    served_model_name: str | None = None

    def __post_init__(self) -> None:
        self.model = Path(self.model)
        if self.tensor_parallel < 1:
            raise ValueError("tensor_parallel must be >= 1")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs")

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model.name


@dataclass(kw_only=True)
class SafetyConfig:
    """Auth, quotas, moderation, audit and watermarking (all off unless configured)."""

    api_keys_file: Path | None = None  # a file of keys, one a line, or a mounted Secret dir
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    max_prompt_tokens: int | None = None  # default: the context length
    max_tokens_cap: int | None = None  # largest max_tokens accepted
    default_max_tokens: int = 16
    blocklist: tuple[str, ...] = ()
    blocklist_action: str = "refuse"  # refuse | redact
    system_prompt: str | None = None
    audit_log: Path | None = None
    watermark_key: str | None = None  # secret; watermarking is on when set
    watermark_gamma: float = 0.25
    watermark_delta: float = 2.0
    max_stop_sequences: int = 4


@dataclass(kw_only=True)
class ServeConfig:
    engine: EngineConfig
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    host: str = "127.0.0.1"
    port: int = 8000
    drain_grace_seconds: float = 30.0
    health_stall_seconds: float = 30.0  # /health fails when work is pending and no token came for this long
    chat_template: Path | None = None  # a jinja2 file used instead of the model directory's own template
