"""Shared tiny fixtures: generated data only (never ../shared/data), tiny models built in-test."""

from __future__ import annotations

import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from genrec.config import ModelConfig, RunConfig, apply_overrides
from genrec.data import clean
from genrec.data.synthetic import generate
from genrec.modeling import add_id_tokens, build_tiny, train_tokenizer
from genrec.pipeline import build_ids, prepare
from genrec.run import RunDir
from genrec.training import train

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


TINY = [
    "data.synthetic_items=240", "data.synthetic_users=150", "data.kcore=2",
    "ids.levels=2", "ids.codes=8", "ids.embedding=collaborative", "ids.collaborative_dim=16",
    "prompt.max_history=4", "prompt.title_words=3",
    "model.hidden_size=64", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
    "model.intermediate_size=96", "model.vocab_size=400",
    "train.max_steps=40", "train.batch_size=16", "train.logging_steps=5", "train.save_steps=20",
    "train.examples_per_user=4", "train.learning_rate=0.005",
    "eval.beam_width=10", "eval.ks=[5,10]", "eval.max_users=40", "eval.batch_size=16", "eval.sasrec_epochs=3",
    "eval.candidates=all", "retrieval.source=text",
]  # fmt: skip


def copy_run(run: RunDir, tmp_path_factory, prefix: str) -> RunDir:
    """A copy of a trained run, for tests that change it (activate templates) where the session's other tests
    must not see it."""
    path = tmp_path_factory.mktemp(prefix) / "run"
    shutil.copytree(run.path, path)
    return RunDir(path)


def make_run(tmp_path, name, extra=()):
    """A prepared run with IDs built, on tiny synthetic data."""
    run = RunDir(tmp_path / name)
    cfg = apply_overrides(RunConfig(name=name), [*TINY, *extra])
    prepare(run, cfg)
    build_ids(run, cfg)
    return run, cfg


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A tiny run trained for 40 steps (about 10 s on 2 CPU cores), shared by pipeline and server tests."""
    run, cfg = make_run(tmp_path_factory.mktemp("runs"), "full")
    summary = train(run, cfg)
    return run, cfg, summary
