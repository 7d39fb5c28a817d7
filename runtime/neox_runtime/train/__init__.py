"""Training: config (`config`), the DeepSpeed loop (`loop`), progress reporting (`progress`), CLI (`cli`)."""
