"""The inference engine: scheduler, KV cache, model runner, sampler, step loop."""

from neox_runtime.serve.engine.sequence import SamplingParams

__all__ = ["SamplingParams"]
