"""Sequence augmentation (train.augment): each operator's output, seeding, what a row may hold, the wiring into
training's examples and labels, and the config's errors."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from genrec.config import RunConfig, apply_overrides
from genrec.data import Example, augment_examples, history_windows, train_examples, without_items
from genrec.data.catalog import augment_sequence, cold_item_rows
from genrec.errors import ConfigError
from genrec.modeling import add_id_tokens, train_tokenizer
from genrec.training import history_loss_rows, prompt_builder, tokenizer_corpus, train, training_examples
from tests.conftest import make_run

sequences = st.lists(st.integers(0, 10_000), min_size=2, max_size=30, unique=True).map(tuple)
ratios = st.floats(0.05, 0.95)
seeds = st.integers(0, 2**31)


def _contiguous_in(sub: tuple[int, ...], seq: tuple[int, ...]) -> bool:
    return any(seq[i : i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def _subsequence_of(sub: tuple[int, ...], seq: tuple[int, ...]) -> bool:
    it = iter(seq)
    return all(x in it for x in sub)


@settings(max_examples=200, deadline=None)
@given(sequences, ratios, seeds)
def test_crop_keeps_a_contiguous_sub_sequence(seq, ratio, seed):
    out = augment_sequence(seq, "crop", ratio, np.random.default_rng(seed))
    assert _contiguous_in(out, seq)
    assert len(out) == max(2, int(np.floor((1 - ratio) * len(seq))))


@settings(max_examples=200, deadline=None)
@given(sequences, ratios, seeds)
def test_mask_keeps_the_rest_in_order(seq, ratio, seed):
    out = augment_sequence(seq, "mask", ratio, np.random.default_rng(seed))
    assert _subsequence_of(out, seq)
    dropped = 0 if len(seq) == 2 else min(len(seq) - 2, max(1, int(np.floor(ratio * len(seq)))))
    assert len(out) == len(seq) - dropped >= 2


@settings(max_examples=200, deadline=None)
@given(sequences, ratios, seeds)
def test_reorder_shuffles_one_contiguous_span(seq, ratio, seed):
    out = augment_sequence(seq, "reorder", ratio, np.random.default_rng(seed))
    assert Counter(out) == Counter(seq)
    moved = [k for k, (a, b) in enumerate(zip(seq, out, strict=True)) if a != b]
    span = min(len(seq), max(2, int(np.floor(ratio * len(seq)))))
    assert not moved or moved[-1] - moved[0] < span


def test_reorder_changes_order_and_mask_drops_items():
    """The operators do something: a no-op would pass the property tests above."""
    rng = np.random.default_rng(0)
    seq = tuple(range(10))
    assert any(augment_sequence(seq, "reorder", 0.5, rng) != seq for _ in range(5))
    assert len(augment_sequence(seq, "mask", 0.3, rng)) == 7
    assert len(augment_sequence(seq, "crop", 0.3, rng)) == 7
    with pytest.raises(ValueError, match="unknown augmentation 'flip'"):
        augment_sequence(seq, "flip", 0.3, rng)


def _examples(n: int = 50) -> list[Example]:
    return [Example(f"u{u}", tuple(range(u, u + 6)), u + 6) for u in range(n)]


def test_augment_examples_is_seeded_and_makes_copies_per_example():
    examples = _examples()
    kinds = ["crop", "mask", "reorder"]
    a = augment_examples(examples, kinds, ratio=0.3, copies=2, seed=7)
    assert a == augment_examples(examples, kinds, ratio=0.3, copies=2, seed=7)
    assert a != augment_examples(examples, kinds, ratio=0.3, copies=2, seed=8)
    assert len(a) == 2 * len(examples)
    assert [ex.user for ex in a] == [ex.user for ex in examples for _ in range(2)]
    # each row comes from its own example's items only
    for ex, aug in zip([ex for ex in examples for _ in range(2)], a, strict=True):
        assert set(aug.history) | {aug.target} <= set(ex.history) | {ex.target}
    # with all three kinds, rows of every kind appear: of 7 items, crop keeps 4, mask 5, reorder all 7
    assert set(Counter(len(ex.history) + 1 for ex in a)) == {4, 5, 7}
    assert augment_examples(examples, [], ratio=0.3, copies=2, seed=7) == []


def test_default_config_adds_no_row(small_data):
    cfg = RunConfig()
    assert cfg.train.augment == []
    examples, augmented = training_examples(small_data, cfg)
    assert augmented == []
    assert examples == history_windows(
        small_data, window=cfg.prompt.max_history, per_user=cfg.train.examples_per_user
    )
    no_history = apply_overrides(cfg, ["train.history_loss=false"])
    examples, augmented = training_examples(small_data, no_history)
    assert augmented == [] and examples == train_examples(small_data, per_user=cfg.train.examples_per_user)


@pytest.mark.parametrize("history_loss", [True, False])
def test_rows_hold_only_the_users_training_items(small_data, history_loss):
    """No augmented row shows a validation or test target, or an item held out of training (data.cold_items)."""
    cold = cold_item_rows(len(small_data.catalog), 0.1, seed=0)
    data = without_items(small_data, cold)
    cfg = apply_overrides(
        RunConfig(),
        [
            "train.augment=[crop,mask,reorder]",
            "train.augment_copies=3",
            "train.augment_ratio=0.5",
            f"train.history_loss={str(history_loss).lower()}",
            "train.examples_per_user=0",
        ],
    )
    examples, augmented = training_examples(data, cfg)
    assert len(augmented) == 3 * len(examples) > 0
    training_part = {u: set(s[:-2]) for u, s in zip(data.users, data.sequences, strict=True)}
    held_out = {u: set(s[-2:]) for u, s in zip(small_data.users, small_data.sequences, strict=True)}
    for ex in augmented:
        items = {*ex.history, ex.target}
        assert items <= training_part[ex.user]
        assert not items & held_out[ex.user]
        assert not items & set(cold)


def test_augmented_rows_label_their_own_shown_items(tmp_path):
    """With train.history_loss, an augmented row's labels are the IDs of the items it shows, after its first,
    and its answer, in the row's order: a dropped item is not labelled, a reordered one is, where it stands."""
    run, cfg = make_run(tmp_path, "aug", ["train.augment=[mask,reorder]", "train.augment_ratio=0.4"])
    data, ids = run.load_data(), run.load_ids()
    builder = prompt_builder(run, cfg, data, ids)
    tokenizer = train_tokenizer(tokenizer_corpus(builder, data), vocab_size=cfg.model.vocab_size)
    add_id_tokens(tokenizer, ids.vocabulary())
    _, augmented = training_examples(data, cfg)
    changed = [ex for ex in augmented if len(ex.history) >= 2][:40]
    rows, _ = history_loss_rows(builder, tokenizer, changed)
    for ex, row in zip(changed, rows, strict=True):
        labelled = [t for t in row["labels"] if t != -100]
        expected = [
            tok
            for item in (*ex.history[1:], ex.target)
            for tok in tokenizer.convert_tokens_to_ids(ids.item_tokens(item))
        ]
        assert labelled == expected


def test_training_adds_the_rows_and_records_them(tmp_path):
    """`genrec train` trains on the augmented rows too and says how many in run.json's train summary."""
    run, cfg = make_run(
        tmp_path, "aug", ["train.augment=[crop,reorder]", "train.augment_copies=2", "train.max_steps=2"]
    )
    summary = train(run, cfg)
    assert summary["augmented_rows"] == 2 * summary["examples"] > 0
    assert run.meta()["train"]["augment"] == ["crop", "reorder"]
    assert run.meta()["train"]["augmented_rows"] == summary["augmented_rows"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.augment=[crop,shuffle]", r"train.augment\[1\]: 'shuffle' is not one of"),
        ("train.augment=[crop,crop]", "train.augment: each augmentation once"),
        ("train.augment_copies=0", "train.augment_copies must be >= 1"),
        ("train.augment_ratio=0", r"train.augment_ratio must be in \(0, 1\)"),
        ("train.augment_ratio=1.5", r"train.augment_ratio must be in \(0, 1\)"),
    ],
)
def test_config_errors_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(RunConfig(), [override])
