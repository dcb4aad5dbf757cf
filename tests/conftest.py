"""Shared tiny fixtures: generated data only (never ../shared/data), tiny models built in-test."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from genrec.config import ModelConfig
from genrec.data import clean
from genrec.data.synthetic import generate
from genrec.modeling import add_id_tokens, build_tiny, train_tokenizer

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def small_data():
    catalog, users, seqs = generate(300, 120, seed=1)
    return clean(catalog, users, seqs, kcore_k=2)


@pytest.fixture(scope="session")
def tiny_lm():
    """A 2-layer Qwen2 with 4 levels x 4 codes of ID tokens, random weights, and its tokenizer."""
    tok = train_tokenizer(
        ["the cat sat on the mat", "recent items oldest first", "next item"] * 20, vocab_size=300
    )
    id_tokens = [f"<{lv}_{c}>" for lv in "abcd" for c in range(4)]
    add_id_tokens(tok, id_tokens)
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)
    model = build_tiny(cfg, tok).eval()
    return model, tok, id_tokens
