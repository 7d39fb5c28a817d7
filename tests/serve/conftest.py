"""Fixtures for the serving tests: tiny model directories and real uvicorn servers on loopback."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from serve_helpers import RunningServer, serve_config
from serve_models import make_model_dir, train_tokenizer


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory, tokenizer_file) -> Callable[..., Path]:
    cache: dict[tuple, Path] = {}

    def make(**variant) -> Path:
        key = tuple(sorted(variant.items()))
        if key not in cache:
            cache[key] = make_model_dir(tmp_path_factory.mktemp("model"), tokenizer_file, **variant)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def model_dir(model_factory) -> Path:
    return model_factory()


@pytest.fixture(scope="module")
def server(model_dir) -> Iterator[RunningServer]:
    srv = RunningServer(serve_config(model_dir))
    yield srv
    srv.stop()


@pytest.fixture
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client
