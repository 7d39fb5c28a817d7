"""Shared fixtures for runtime tests: CPU-only, few threads, tiny random architectures."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture
def tiny_arch():
    from neox_runtime.api.architecture import ModelArchitecture

    return ModelArchitecture(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64, rotary_pct=0.25, max_position_embeddings=64)


@pytest.fixture(scope="session")
def byte_data(tmp_path_factory):
    from runtime_helpers import byte_shards

    return byte_shards(tmp_path_factory.mktemp("bytes"))
