import re

import numpy as np
import pytest

from genrec.baselines import (
    SASRecConfig,
    itemknn_lists,
    markov_lists,
    retriever_lists,
    sasrec_lists,
)
from genrec.data import Catalog, Example, Interactions, leave_one_out
from genrec.retrieval import Retriever


def cyclic(n_items=20, n_users=200, length=12, seed=0):
    """Each user walks i -> i+1 (mod n) from a random start: the next item is fully determined."""
    rng = np.random.default_rng(seed)
    ids = [f"i{i}" for i in range(n_items)]
    cat = Catalog(ids, ids, ids)
    seqs = [[(s + t) % n_items for t in range(length)] for s in rng.integers(0, n_items, n_users)]
    return Interactions(cat, [f"u{i}" for i in range(n_users)], seqs)


def hit1(lists, examples):
    return np.mean([lst[:1] == [ex.target] for lst, ex in zip(lists, examples, strict=True)])


def test_sasrec_learns_a_deterministic_sequence():
    data = cyclic()
    test = leave_one_out(data, "test")
    lists = sasrec_lists(
        data, test, split="test", k=5, cfg=SASRecConfig(hidden=32, epochs=100, max_len=12), progress=False
    )
    assert hit1(lists, test) > 0.9
    assert all(not set(lst) & set(ex.history) for lst, ex in zip(lists, test, strict=True))


def test_sasrec_loss_is_the_padded_cross_entropy_with_logits_only_where_a_target_is():
    import torch

    from genrec.baselines import SASRec, _left_pad, sasrec_loss

    torch.manual_seed(0)
    model = SASRec(20, SASRecConfig(hidden=16, dropout=0.0))
    seqs = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11]]
    x, y = _left_pad([s[:-1] for s in seqs], 6), _left_pad([s[1:] for s in seqs], 6) - 1
    ours = sasrec_loss(model, x, y)
    ours.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits = model(x)
    full = torch.nn.functional.cross_entropy(logits.reshape(-1, 20), y.reshape(-1), ignore_index=-1)
    full.backward()
    assert torch.allclose(ours, full, atol=1e-6)
    for g, p in zip(grads, model.parameters(), strict=True):
        assert torch.allclose(g, p.grad, rtol=1e-4, atol=1e-5)


def test_sasrec_holds_out_the_validation_item_and_keeps_the_best_epoch(monkeypatch, caplog):
    """patience > 0: the last visible item of each user is ranked, not trained on; training stops once
    validation NDCG@10 stops rising and the best epoch's weights rank the test users."""
    import logging

    from genrec import baselines

    data = cyclic()
    test = leave_one_out(data, "test")
    padded = []
    left_pad = baselines._left_pad
    monkeypatch.setattr(
        baselines, "_left_pad", lambda seqs, n: padded.append(list(seqs)) or left_pad(seqs, n)
    )
    cfg = SASRecConfig(hidden=32, epochs=100, max_len=12, eval_every=2, patience=2)
    with caplog.at_level(logging.INFO, logger="genrec.baselines"):
        lists = sasrec_lists(data, test, split="test", k=5, cfg=cfg, progress=False)
    assert hit1(lists, test) > 0.9
    targets = padded[1]  # the training targets: each user's sequence minus the test and validation items
    assert targets == [list(s[1:-2]) for s in data.sequences]
    best, last = map(int, re.search(r"at epoch (\d+) of (\d+)", caplog.text).groups())
    assert last == best + 2 * 2 < 100  # stopped after two rankings without a better one

    padded.clear()
    sasrec_lists(
        data, test[:3], split="test", k=5, cfg=SASRecConfig(hidden=8, epochs=1, patience=0), progress=False
    )
    assert padded[1] == [
        list(s[1:-1]) for s in data.sequences
    ]  # no selection: the validation item trained on


def test_itemknn_recommends_from_the_cluster_of_the_history():
    """Two disjoint item clusters; each user stays in one. Item-kNN must stay in the user's cluster."""
    rng = np.random.default_rng(0)
    ids = [f"i{i}" for i in range(20)]
    seqs = [list(rng.choice(10, 6, replace=False) + 10 * (u % 2)) for u in range(200)]
    data = Interactions(Catalog(ids, ids, ids), [f"u{u}" for u in range(200)], seqs)
    test = leave_one_out(data, "test")
    lists = itemknn_lists(data, test, split="test", k=3)
    assert all({i // 10 for i in lst} == {ex.history[0] // 10} for lst, ex in zip(lists, test, strict=True))


def test_markov_follows_transitions_and_fills_full_lists():
    data = cyclic()
    test = leave_one_out(data, "test")
    lists = markov_lists(data, test, split="test", k=5)
    assert hit1(lists, test) == 1.0  # i -> i+1 is the only transition seen
    assert all(len(lst) == 5 and not set(lst) & set(ex.history) for lst, ex in zip(lists, test, strict=True))


def test_markov_weighs_the_last_item_most_and_sees_only_the_split():
    """Transitions a->x 2, a->v 1, b->y 3, b->a 1. A user ending [b, a] scores x 2/3 and v 1/3 from a (age 0)
    and y 0.5 * 3/4 from b (age 1): [x, y, v]. For the validation split the pair a->v is the last user's
    validation target, so it is not seen: v drops out and the items tied below (none is visible before the
    validation targets: popularity 0) fill the list, the lowest index first."""
    ids = [f"i{i}" for i in range(8)]
    a, b, x, y, v = 0, 1, 2, 3, 7
    seqs = [[a, x, 5, 6], [a, x, 6, 5], [b, y, 5, 6], [b, y, 6, 5], [b, y, 5, 6], [b, a, v, 4]]
    data = Interactions(Catalog(ids, ids, ids), [f"u{i}" for i in range(len(seqs))], seqs)
    assert markov_lists(data, [Example("u", (b, a), 4)], split="test", k=3)[0] == [x, y, v]
    valid = leave_one_out(data, "valid")[-1]
    assert valid.history == (b, a) and valid.target == v
    ranked = markov_lists(data, [valid], split="valid", k=3)[0]
    assert ranked == [x, y, 4]


def test_retriever_baseline_excludes_history():
    emb = np.eye(6, dtype=np.float32)
    data = cyclic(n_items=6, n_users=10, length=4)
    test = leave_one_out(data, "test")
    lists = retriever_lists(Retriever(emb), test, k=2)
    assert all(len(lst) == 2 and not set(lst) & set(ex.history) for lst, ex in zip(lists, test, strict=True))


def test_evaluate_trains_sasrec_with_the_runs_seed(monkeypatch):
    """train.seed reaches the SASRec baseline, so runs with other seeds show both methods' spread."""
    from types import SimpleNamespace

    from genrec import baselines
    from genrec.config import RunConfig, apply_overrides
    from genrec.evaluation import baseline_lists

    seen = []
    monkeypatch.setattr(baselines, "sasrec_lists", lambda *a, cfg, **kw: seen.append(cfg) or [[0]])
    for seed in (0, 3):
        cfg = apply_overrides(
            RunConfig(), ["eval.baselines=[sasrec]", f"train.seed={seed}", "eval.sasrec_epochs=7"]
        )
        out = baseline_lists(SimpleNamespace(data=None), [], cfg, np.zeros(1), progress=False)
        assert out == {"sasrec": [[0]]}
    assert [(c.seed, c.epochs) for c in seen] == [(0, 7), (3, 7)]


def test_sasrec_pads_batches_to_the_longest_sequence_within_max_len(monkeypatch):
    """Columns no sequence reaches are not padded (the demo data's sequences are at most 30 long, max_len is
    50); sequences longer than max_len still keep their last max_len items."""
    from genrec import baselines

    data = cyclic(length=12)  # test histories: 11 items, the longest input anywhere
    test = leave_one_out(data, "test")
    widths: list[int] = []
    encode = baselines.SASRec.encode
    monkeypatch.setattr(
        baselines.SASRec, "encode", lambda self, seq: widths.append(seq.shape[1]) or encode(self, seq)
    )
    for max_len, expected in ((50, 11), (8, 8)):
        widths.clear()
        cfg = SASRecConfig(hidden=8, epochs=2, max_len=max_len, eval_every=1, patience=1)
        sasrec_lists(data, test, split="test", k=5, cfg=cfg, progress=False)
        assert widths and set(widths) == {expected}
    assert baselines.sasrec_window(50, [[1] * 60], [[2] * 3]) == 50
    assert baselines.sasrec_window(50, [], []) == 1


def test_sasrec_interrupted_goes_on_from_its_kept_state_to_the_same_lists(tmp_path, monkeypatch, caplog):
    """Killed after epoch 4 (state kept every epoch), then called again: it trains from epoch 5 only and ranks
    as one uninterrupted call does. A state that ended training trains nothing; another key's is not used."""
    import logging

    from genrec import baselines

    data = cyclic()
    test = leave_one_out(data, "test")
    cfg = SASRecConfig(hidden=16, epochs=9, max_len=12, eval_every=2, patience=2)
    whole = sasrec_lists(data, test, split="test", k=5, cfg=cfg, progress=False)
    state = tmp_path / "sasrec.state.pt"
    save, epochs, armed = baselines._save_sasrec_state, [], [True]

    def killed_after_4(path, key, model, opt, best, epoch, finished):
        save(path, key, model, opt, best, epoch, finished)
        epochs.append(epoch)
        if epoch == 4 and armed:
            armed.clear()
            raise KeyboardInterrupt

    monkeypatch.setattr(baselines, "_save_sasrec_state", killed_after_4)
    with pytest.raises(KeyboardInterrupt):
        sasrec_lists(
            data, test, split="test", k=5, cfg=cfg, progress=False, checkpoint=state, checkpoint_key="a"
        )
    resumed = sasrec_lists(
        data, test, split="test", k=5, cfg=cfg, progress=False, checkpoint=state, checkpoint_key="a"
    )
    assert epochs == [1, 2, 3, 4, 5, 6, 7, 8, 9] and resumed == whole

    loss = baselines.sasrec_loss
    monkeypatch.setattr(baselines, "sasrec_loss", lambda *a: pytest.fail("trained again"))
    assert (
        sasrec_lists(
            data, test, split="test", k=5, cfg=cfg, progress=False, checkpoint=state, checkpoint_key="a"
        )
        == whole
    )
    monkeypatch.setattr(baselines, "sasrec_loss", loss)
    epochs.clear()
    with caplog.at_level(logging.WARNING, logger="genrec.baselines"):
        other = sasrec_lists(
            data, test, split="test", k=5, cfg=cfg, progress=False, checkpoint=state, checkpoint_key="b"
        )
    assert epochs[0] == 1 and other == whole and "SASRec state of another evaluation" in caplog.text
