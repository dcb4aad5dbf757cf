import numpy as np
import pytest

from genrec.errors import GenrecError
from genrec.ids import ItemIds, atomic_ids, semantic_ids
from genrec.retrieval import Retriever, collaborative_embeddings
from tests.conftest import make_run


def clustered(n=200, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(8, dim))
    x = centers[rng.integers(0, 8, n)] + 0.1 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_semantic_ids_unique_fixed_depth_and_roundtrip(tmp_path):
    emb = clustered()
    ids = semantic_ids(emb, levels=2, codes=8, seed=0)
    assert ids.codes.shape == (200, 3) and ids.depth == 3
    strings = [ids.item_string(i) for i in range(len(ids))]
    assert len(set(strings)) == len(strings)
    assert all(ids.parse(s) == i for i, s in enumerate(strings))
    assert ids.parse("<a_0><b_0>") is None and ids.parse("hello") is None
    ids.save(tmp_path, [f"I{i}" for i in range(200)])
    again = ItemIds.load(tmp_path)
    assert np.array_equal(again.codes, ids.codes) and len(again.codebooks) == 2
    assert ids.vocabulary()[0] == "<a_0>" and len(ids.vocabulary()) == sum(ids.level_sizes)


def test_semantic_ids_are_semantic():
    emb = clustered()
    ids = semantic_ids(emb, levels=2, codes=8, seed=0)
    # nearest neighbours share the first code far more often than random pairs
    sims = emb @ emb.T
    np.fill_diagonal(sims, -1)
    nn = sims.argmax(1)
    assert np.mean(ids.codes[:, 0] == ids.codes[nn, 0]) > 0.9


def test_cold_start_item_gets_an_id_without_retraining():
    emb = clustered()
    ids = semantic_ids(emb, levels=2, codes=8, collision_headroom=2, seed=0)
    new = emb[5] + 0.01  # a new item very close to item 5
    codes = ids.assign(new / np.linalg.norm(new))
    assert codes[:2] == tuple(int(c) for c in ids.codes[5, :2])  # same semantic prefix
    assert all(c < n for c, n in zip(codes, ids.level_sizes, strict=True))  # uses existing tokens only
    row = ids.add(codes)
    assert ids.parse(ids.item_string(row)) == row
    with pytest.raises(GenrecError, match="already taken"):
        ids.add(codes)


def test_cold_start_moves_to_the_next_last_code_then_reports_a_full_region():
    emb = clustered()
    ids = semantic_ids(emb, levels=2, codes=8, collision_headroom=0, seed=0)
    # with no headroom the largest prefix group uses every collision code: a new item there takes the
    # next-nearest last-level code that still has a free collision number, under the same first code
    row = int(np.nonzero(ids.codes[:, -1] == ids.level_sizes[-1] - 1)[0][0])
    codes = ids.assign(emb[row])
    assert codes[0] == ids.codes[row, 0] and codes[1] != ids.codes[row, 1]
    ids.add(codes)
    # every (last code, collision number) slot under the first code gets used; then it says what to do
    slots = ids.codebooks[-1].shape[0] * ids.level_sizes[-1]
    with pytest.raises(GenrecError, match="collision_headroom"):
        for _ in range(slots):
            ids.add(ids.assign(emb[row]))


def test_atomic_ids():
    ids = atomic_ids(5)
    assert ids.item_string(3) == "<item_3>" and ids.parse("<item_3>") == 3 and ids.depth == 1


def test_collaborative_embeddings_capture_cooccurrence(small_data):
    emb = collaborative_embeddings(small_data, dim=16)
    assert emb.shape == (len(small_data.catalog), 16)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)


def test_retriever_excludes_seen_and_weights_recency():
    emb = np.eye(4, dtype=np.float32)
    r = Retriever(emb, recency_decay=0.5)
    items, _scores = r.search(r.history_query([0, 1]), 3, exclude=[[1]])
    assert 1 not in items[0] and items[0][0] == 0
    # most recent item dominates the query
    q = r.history_query([2, 3])
    assert q[3] > q[2]
    assert r.for_histories([[0, 1, 2]], 5) == [[3]]


@pytest.mark.parametrize("k", [1, 7, 40, 60])
def test_retriever_search_keeps_each_rows_first_k_not_excluded(k):
    """`search` (vectorised over rows) gives each query its best k items minus its own excluded ones, in
    score order, padded with -1 / -inf where the catalogue runs out: as a row-by-row filter of the index's
    answer does. Excluded lists may repeat items, hold items outside the top, or ids outside the catalogue."""
    rng = np.random.default_rng(k)
    r = Retriever(rng.normal(size=(50, 8)).astype(np.float32))
    queries = rng.normal(size=(6, 8)).astype(np.float32)
    # 57 and -1: ids outside the catalogue exclude nothing (not the next row's item 7, nor the row before's 49)
    exclude = [[57], [3, -1], list(rng.choice(50, 20, replace=False)), [5, 5, 5], list(range(50)), [49, 0]]
    items, scores = r.search(queries, k, exclude=exclude)
    full_s, full_i = r.index.search(queries, 50)
    for q in range(6):
        want = [(i, s) for i, s in zip(full_i[q], full_s[q], strict=True) if i not in set(exclude[q])][:k]
        assert items[q].tolist() == [i for i, _ in want] + [-1] * (k - len(want))
        assert scores[q][: len(want)] == pytest.approx([s for _, s in want], abs=1e-6)
        assert np.isneginf(scores[q][len(want) :]).all()
    top = min(k, 50)  # no exclusions: the index's own top k
    assert (r.search(queries, k)[0][:, :top] == full_i[:, :top]).all() and (
        r.search(queries, k)[0][:, top:] == -1
    ).all()


def test_retriever_without_faiss_matches_faiss(monkeypatch):
    """Machines without faiss (the GPU image) fall back to exact numpy search with the same results."""
    import builtins

    rng = np.random.default_rng(3)
    emb = rng.normal(size=(300, 16)).astype(np.float32)
    histories = [list(rng.choice(300, size=n, replace=False)) for n in (1, 4, 9)]
    with_faiss = Retriever(emb)
    real_import = builtins.__import__

    def no_faiss(name, *args, **kwargs):
        if name == "faiss":
            raise ImportError("no faiss here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_faiss)
    without = Retriever(emb)
    assert type(without.index).__name__ == "_NumpyFlatIP"
    for k in (1, 10, 300):
        assert with_faiss.for_histories(histories, k) == without.for_histories(histories, k)
    q = np.stack([with_faiss.history_query(h) for h in histories])
    np.testing.assert_allclose(with_faiss.search(q, 7)[1], without.search(q, 7)[1], rtol=1e-5)


def test_spread_last_gives_items_sharing_a_prefix_distinct_last_codes():
    emb = clustered(n=300)
    plain = semantic_ids(emb, levels=2, codes=8, seed=0)
    spread = semantic_ids(emb, levels=2, codes=8, seed=0, spread_last=True)
    assert np.array_equal(plain.codes[:, 0], spread.codes[:, 0])  # earlier levels untouched
    for first in np.unique(spread.codes[:, 0]):
        members = spread.codes[:, 0] == first
        n, used = int(members.sum()), len(np.unique(spread.codes[members, 1]))
        assert used == min(n, 8)  # as many distinct last codes as the codebook allows
        # the collision level numbers only the overflow: groups of ceil(n / 8) at most
        assert spread.codes[members, 2].max() < -(-n // 8) + 1
    assert spread.level_sizes[-1] < plain.level_sizes[-1]
    strings = [spread.item_string(i) for i in range(len(spread))]
    assert len(set(strings)) == len(strings) and all(spread.parse(s) == i for i, s in enumerate(strings))
    # with a larger first level, groups whose nearest last codes are already distinct keep them
    plain, spread = (semantic_ids(emb, levels=2, codes=32, seed=0, spread_last=s) for s in (False, True))
    kept = 0
    for first in np.unique(plain.codes[:, 0]):
        members = plain.codes[:, 0] == first
        if members.sum() > 1 and len(np.unique(plain.codes[members, 1])) == members.sum():
            assert np.array_equal(spread.codes[members, 1], plain.codes[members, 1])
            kept += 1
    assert kept and not np.array_equal(spread.codes, plain.codes)
    # with one level every item shares the empty prefix: the codebook is filled evenly
    one = semantic_ids(emb, levels=1, codes=8, seed=0, spread_last=True)
    assert np.bincount(one.codes[:, 0], minlength=8).max() == -(-300 // 8)


def test_build_ids_passes_spread_last_on(tmp_path):
    def shared_prefixes(run):
        codes = ItemIds.load(run.path).codes[:, :-1]
        return len(codes) - len(np.unique(codes, axis=0))

    plain, _ = make_run(tmp_path, "plain")
    spread, cfg = make_run(tmp_path, "spread", ["ids.spread_last=true"])
    assert cfg.ids.spread_last and shared_prefixes(spread) < shared_prefixes(plain)


def test_input_tokens_are_one_per_item_after_the_codes_and_cold_start_items_have_none(tmp_path):
    emb = clustered()
    ids = semantic_ids(emb, levels=2, codes=8, seed=0)
    ids.input_items = len(ids)
    codes = sum(ids.level_sizes)
    vocab = ids.vocabulary()
    assert vocab[codes:] == [f"<in_{i}>" for i in range(200)] and len(set(vocab)) == len(vocab)
    assert ids.input_token(7) == "<in_7>" and ids.item_string(7) == "".join(
        ids.item_tokens(7)
    )  # answers: codes
    assert ids.parse(ids.item_string(7) + ids.input_token(7)) == 7  # as a prompt shows it
    ids.save(tmp_path, [f"I{i}" for i in range(200)])
    again = ItemIds.load(tmp_path)
    assert again.input_items == 200 and again.vocabulary() == vocab
    row = ids.add(ids.assign(emb[5] + 0.01))  # cold start: a new item shows its codes only
    assert row == 200 and ids.input_token(row) == "" and len(ids.vocabulary()) == len(vocab)
    plain = semantic_ids(emb, levels=2, codes=8, seed=0)
    assert plain.input_items == 0 and plain.input_token(0) == "" and len(plain.vocabulary()) == codes


def test_build_ids_gives_every_item_an_input_token_only_when_asked(tmp_path):
    from genrec.config import ConfigError, RunConfig, apply_overrides

    with_tokens, _ = make_run(tmp_path, "in", ["ids.input_tokens=true"])
    plain, _ = make_run(tmp_path, "plain")
    n = len(with_tokens.load_data().catalog)
    assert ItemIds.load(with_tokens.path).input_items == n and ItemIds.load(plain.path).input_items == 0
    assert with_tokens.meta()["ids"]["input_tokens"] == n
    with pytest.raises(ConfigError, match="ids.input_tokens is for semantic IDs"):
        apply_overrides(RunConfig(), ["ids.scheme=atomic", "ids.input_tokens=true"])
