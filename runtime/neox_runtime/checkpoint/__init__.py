"""Checkpoints: Hugging Face directories (`hf`), DeepSpeed -> HF conversion (`convert`)."""
