"""A trained run loaded for inference: history or free text in, ranked catalogue items out.

Owns resolving user ids, item ids and titles into catalogue rows, choosing candidates
(retriever top-N or the whole catalogue minus seen items), building tries of their ID token
sequences, and calling an engine. Front ends (CLI, batch, server) use only this class.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from genrec.config import SEARCHES, CandidateMode, RankingOptions, RunConfig
from genrec.cpu_time import StageClock
from genrec.data import Interactions
from genrec.decoding import Ranked, Trie
from genrec.decoding.tree import TreeLayout
from genrec.engines import Engine, HFEngine
from genrec.errors import GenrecError
from genrec.id_softmax import softmax_groups
from genrec.ids import ItemIds
from genrec.modeling import load_trained
from genrec.retrieval import (
    CollaborativeRetriever,
    PooledRetriever,
    Retriever,
    TextScores,
    collaborative_kind,
    fuse,
    load_collaborative,
)
from genrec.run import RunDir, with_chosen_candidates
from genrec.templates.prompt_store import TemplateStore, TemplateVersion
from genrec.templates.prompts import PromptBuilder, PromptTemplate

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class Recommendation:
    item: int
    item_id: str
    title: str
    score: float


@dataclass
class RankRequest:
    """One ranking request: a history (catalogue rows, oldest first) and its options."""

    history: list[int]
    options: RankingOptions = field(default_factory=RankingOptions)
    """How it is ranked (items, candidates, beams): checked when the options were made."""
    user: str | None = None
    exclude: list[int] = field(default_factory=list)
    template: str | None = None
    template_version: int | None = None
    """Pinned when the request is admitted (Recommender.pin_template), so a template activated
    while it waits does not change the prompt it was accepted with; None: the active version."""
    messages: list[dict[str, str]] | None = None
    """Already rendered prompt; None: rendered here with the pinned template (the server renders each request
    of its engine batch on its own first, so that a template error is that request's 4xx and never fails the
    batch: RecService._rank_batch)."""
    prompt_tokens: int = 0
    """Filled in by Recommender.rank_requests: the prompt's length in tokens (for usage reporting)."""
    query: str | None = None
    """Free text from the user (a need: 'something for rainy days'), with or without a history. It is rendered
    into the prompt by prompt.need_template (unless `template` names another) and retrieves candidates of its
    own: with a history, the union of both queries' candidates."""

    @property
    def n_items(self) -> int:
        return self.options.n_items

    @property
    def candidates(self) -> CandidateMode:
        return self.options.candidates

    @property
    def n_candidates(self) -> int:
        return self.options.n_candidates

    @property
    def beam_width(self) -> int | None:
        return self.options.beam_width


@dataclass
class PreparedBatch:
    """What `Recommender.prepare` makes of a batch of requests: plain lists, cheap to send between processes."""

    prompts: list[list[int]]
    """Each request's prompt token ids."""
    retrieved: list[list[int] | None]
    """Each request's retrieved candidates (catalogue rows); None where it ranks the whole catalogue."""
    layouts: list[TreeLayout | None] | None = None
    """Tree layouts for the transformers engine's exact scoring, when a worker made them (None: not made;
    a None entry: that request goes to beam search)."""
    retrieved_scores: list[list[float] | None] | None = None
    """The collaborative retriever's score of each retrieved candidate, fused with the LM's (retrieval.source);
    None where no fusion applies."""
    text_vectors: list[np.ndarray | None] | None = None
    """Each request's free text embedded by the run's text encoder (None: no text, or item embeddings that are
    not text), whose cosine with the ranked items is fused (retrieval.text_weight)."""


def history_requests(
    histories: Sequence[Sequence[int]],
    options: RankingOptions,
    *,
    users: Sequence[str | None] | None = None,
    exclude: Sequence[Sequence[int]] | None = None,
    queries: Sequence[str | None] | None = None,
) -> list[RankRequest]:
    """One RankRequest per history, all with the same options (users, exclusions and free-text queries per
    history)."""
    users = users or [None] * len(histories)
    queries = queries or [None] * len(histories)
    return [
        RankRequest(
            list(h),
            options,
            user=u,
            exclude=list(exclude[k]) if exclude else [],
            query=queries[k] or None,
        )
        for k, (h, u) in enumerate(zip(histories, users, strict=True))
    ]


class UnknownItems(GenrecError):
    def __init__(self, unknown: Sequence[str]) -> None:
        self.unknown = list(unknown)
        super().__init__(f"unknown item(s): {', '.join(map(repr, self.unknown[:10]))}")


@dataclass
class UserQuery:
    """Whom and what a request ranks for, resolved against the run: a history (catalogue rows, oldest first),
    free text, or both; `user` labels it (a known user, or a caller's own id)."""

    history: list[int]
    text: str | None = None
    user: str | None = None


class QueryProblem(GenrecError):
    """Why a request's user, history or text cannot be ranked: `field` names the input (`user`, `history`,
    `text`), `code` the kind (the server's error code; with `_` read as a space, a batch job's reject kind)."""

    def __init__(self, field: str, code: str, message: str) -> None:
        self.field, self.code = field, code
        super().__init__(message)


class Recommender:
    def __init__(
        self,
        run: RunDir,
        cfg: RunConfig,
        data: Interactions,
        ids: ItemIds,
        engine: Engine,
        retriever: Retriever,
        *,
        collab: CollaborativeRetriever | None = None,
        fusion_weight: float | None = 0.0,
        held_out: Collection[int] = (),
    ) -> None:
        self.run, self.cfg, self.data, self.ids, self.engine, self.retriever = (
            run,
            cfg,
            data,
            ids,
            engine,
            retriever,
        )
        self.collab = collab
        """The collaborative retriever of retrieval.source (None: candidates from the text retriever alone)."""
        self.fusion_weight = fusion_weight
        """Weight of the collaborative score in the fused one (retrieval.fusion_weight); None: `auto` and not yet
        chosen (genrec.evaluation.choose_fusion_weight)."""
        self.text_weight = text_weight_of(run, cfg)
        """Weight of a request's free-text score in the fused one (retrieval.text_weight); None: `auto` and not yet
        chosen (genrec.evaluation.choose_text_weight): such requests are ranked with 0 until it is."""
        self._said_text_weight = False
        self.held_out = frozenset(held_out)
        """Items never ranked, for any request: those held out of training (data.cold_items) while the model
        being trained is ranked (training's validation, the RL stage), since they do not exist for it yet."""
        self.catalog = data.catalog
        self.templates = TemplateStore.for_run(run.path)
        self.template_name = cfg.prompt.template
        self.need_template = cfg.prompt.need_template
        """The template of requests that carry free text (RankRequest.query)."""
        self.text_embeddings = str(run.meta().get("ids", {}).get("embedding", "")).startswith("text")
        """Whether free text can retrieve: the run's item embeddings come from a text encoder."""
        self.trained_template: dict[str, Any] = run.meta().get("template", {})
        """Name and hash of the template the loaded model was trained with (read once, at load)."""
        self.item_tokens = self._item_token_ids()
        self._users = data.user_index()
        self._titles = {t.lower(): i for i, t in enumerate(self.catalog.titles) if t}
        self._all = Trie(self.item_tokens.tolist())
        self._builders: dict[tuple[str, int], PromptBuilder] = {}
        self._encoder: Any = None
        self.clock = StageClock()
        """CPU time of this recommender's work by stage (render, tokenise, retrieve, layout, rank, results)."""

    @classmethod
    def load(
        cls, run: RunDir, *, backend: str = "hf", device: str | None = None, search: str | None = None
    ) -> Recommender:
        """The run's merged model behind the `hf` (transformers), `vllm` (offline `vllm.LLM`: batch,
        evaluation) or `vllm-async` (`AsyncLLM`: the server) engine. `search` overrides the run's
        eval.search (auto | beam | exact; the vLLM engines only beam-search)."""
        cfg = run.load_config()
        search = search or cfg.eval.search
        if search not in SEARCHES:
            raise GenrecError(f"--search / eval.search must be one of {', '.join(SEARCHES)}; got {search!r}")
        if search == "exact" and backend != "hf":
            raise GenrecError(
                "exact tree scoring runs on the transformers engine: use --backend hf (or --search beam)"
            )
        ids = run.load_ids()
        # score as the model was trained: over the vocabulary, or over ID-token groups (model.id_softmax)
        groups = softmax_groups(ids.level_tokens(), run.trained_id_softmax())
        engine: Engine
        if backend == "hf":
            engine = HFEngine(
                *load_trained(run.model_dir(), device=device, dtype=cfg.model.dtype),
                search=search,
                max_tree_tokens=cfg.eval.max_tree_tokens,
                cuda_graphs=cfg.eval.cuda_graphs,
                softmax_groups=groups,
            )
        elif backend == "vllm":
            from genrec.engines.vllm import VLLMEngine

            engine = VLLMEngine(run.model_dir(), softmax_groups=groups)
        elif backend == "vllm-async":
            from genrec.engines.vllm import AsyncVLLMEngine

            engine = AsyncVLLMEngine(run.model_dir(), softmax_groups=groups)
        else:
            raise GenrecError(f"backend must be 'hf', 'vllm' or 'vllm-async', got {backend!r}")
        retriever = Retriever(run.load_embeddings())
        collab, weight = load_retrieval(run, cfg, text=retriever)
        cfg = with_chosen_candidates(run, cfg)
        return cls(run, cfg, run.load_data(), ids, engine, retriever, collab=collab, fusion_weight=weight)

    def _item_token_ids(self) -> np.ndarray:
        tok = self.engine.tokenizer
        rows = [tok.convert_tokens_to_ids(self.ids.item_tokens(i)) for i in range(len(self.ids))]
        arr = np.asarray(rows, dtype=np.int64)
        unk = getattr(tok, "unk_token_id", None)
        if unk is not None and (arr == unk).any():
            raise GenrecError(
                "the model's tokenizer lacks some item-ID tokens; was it trained on this run's IDs?"
            )
        return arr

    # -- resolving inputs -------------------------------------------------------------------------
    def resolve_items(self, refs: Sequence[str]) -> list[int]:
        """Catalogue rows for item ids, ID strings (`<a_1>...`) or exact titles; unknowns raise, all named."""
        rows, unknown = [], []
        for ref in refs:
            ref = str(ref).strip()
            row = self.catalog.index.get(ref)
            if row is None and ref.startswith("<"):
                row = self.ids.parse(ref)
            if row is None:
                row = self._titles.get(ref.lower())
            if row is None:
                unknown.append(ref)
            else:
                rows.append(row)
        if unknown:
            raise UnknownItems(unknown)
        return rows

    def resolve_query(
        self,
        *,
        user: str | None = None,
        history: Sequence[str] | str | None = None,
        text: object = None,
        split: str = "full",
        strict_user: bool = True,
        max_history: int | None = None,
    ) -> UserQuery:
        """The one resolution of a request's inputs, for every front end (server, batch rows, template preview,
        `genrec recommend`): `history` (item ids, ID strings or exact titles, oldest first; a string is split
        on commas) wins; else a known `user`'s history as of `split`; else `text` alone is a new user's
        request in words. Text beside a history is the user's stated need. `strict_user`: a user given beside a
        history must be one of the run's (the server and the CLI: a typo is not silently ignored); False, it
        only labels the query (a batch job's output key). Raises QueryProblem naming the input at fault."""
        if text is not None and not isinstance(text, str):
            raise QueryProblem("text", "text_not_a_string", "field 'text': expected a string")
        need = text.strip() or None if text else None
        if history is not None:
            refs = [h for h in history.split(",") if h.strip()] if isinstance(history, str) else history
            if not isinstance(refs, list | tuple):
                raise QueryProblem(
                    "history", "history_not_a_list", "field 'history': expected a list of items"
                )
            try:
                items = self.resolve_items([str(h) for h in refs])
            except UnknownItems as e:
                raise QueryProblem("history", "unknown_items", f"field 'history': {e}") from None
            if user is not None and strict_user and not self.knows_user(user):
                raise QueryProblem(
                    "user",
                    "unknown_user",
                    f"unknown user {user!r}: send a user of the run's data beside a history, or leave it out",
                )
            if not items and need is None:
                raise QueryProblem("history", "empty_history", "field 'history': empty")
        elif user is not None and self.knows_user(user):
            items = self.user_history(user, split=split)
        elif need is not None:  # a new user's request in words alone
            items = []
        elif user is not None:
            raise QueryProblem("user", "unknown_user", f"field 'user': unknown user {user!r} and no history")
        else:
            raise QueryProblem(
                "history",
                "no_user_or_history",
                "no user, history or text: give items (ids, ID strings or titles), a known user, or what the user "
                "wants in words",
            )
        if max_history is not None and len(items) > max_history:
            raise QueryProblem(
                "history",
                "history_too_long",
                f"history has {len(items)} items; the limit is {max_history}",
            )
        return UserQuery(items, need, user)

    def knows_user(self, user: str) -> bool:
        return user in self._users

    def user_history(self, user: str, *, split: str = "test") -> list[int]:
        """A known user's history as of `split` (test: all but the last item; full: everything)."""
        if user not in self._users:
            raise GenrecError(f"unknown user {user!r}")
        seq = self.data.sequences[self._users[user]]
        return seq[:-1] if split == "test" else seq[:-2] if split == "valid" else list(seq)

    # -- candidates ------------------------------------------------------------------------------
    def retrieved(self, history: Sequence[int], *, n: int, exclude: Sequence[int] = ()) -> list[int]:
        """The retriever's top-n items for a history, skipping the history and `exclude`."""
        return self.retrieved_many([history], n=[n], exclude=[exclude])[0]

    def retrieved_many(
        self, histories: Sequence[Sequence[int]], *, n: Sequence[int], exclude: Sequence[Sequence[int]]
    ) -> list[list[int]]:
        """`retrieved` for several histories in one index search (each with its own n and exclusions)."""
        if not all(histories):
            raise GenrecError("candidates=retriever needs a history (or use free text)")
        if not histories:
            return []
        queries = np.stack([self.retriever.history_query(h) for h in histories])
        banned = [sorted(set(h) | set(ex)) for h, ex in zip(histories, exclude, strict=True)]
        items, _ = self.retriever.search(queries, max(n), exclude=banned)
        return [row[:k][row[:k] >= 0].tolist() for row, k in zip(items, n, strict=True)]

    def candidate_trie(self, r: RankRequest) -> Trie:
        """Trie of the request's candidates: the catalogue minus seen/excluded items, or the retrieved ones."""
        return self.candidate_tries([r])[0]

    def candidate_tries(self, requests: Sequence[RankRequest]) -> list[Trie]:
        """`candidate_trie` for a batch: the retriever-mode requests share one index search."""
        return self._tries(requests, self._retrieve(requests))

    def prepared_tries(self, requests: Sequence[RankRequest], prepared: PreparedBatch) -> list[Trie]:
        """The candidate tries of a prepared batch (from its retrieved candidates; no index search)."""
        return self._tries(requests, prepared.retrieved)

    def _retrieve(
        self, requests: Sequence[RankRequest], vectors: Sequence[np.ndarray | None] | None = None
    ) -> list[list[int] | None]:
        """Each retriever-mode request's candidates (one index search per kind of query), None for mode `all`:
        the history's top n_candidates, the free text's (RankRequest.query; `vectors`: the texts already
        embedded), or the union of both (history's first). A request with text alone, on a run without text
        embeddings, ranks the whole catalogue."""
        retrieve = [r for r in requests if r.candidates != "all"]
        if any(not r.history and not r.query for r in retrieve):
            raise GenrecError("candidates=retriever needs a history or free text")
        by_history = [r for r in retrieve if r.history]
        found_h = (self.retrieved_many if self.collab is None else self.collaborative_candidates)(
            [r.history for r in by_history],
            n=[r.n_candidates for r in by_history],
            exclude=[[*r.exclude, *self.held_out] if self.held_out else r.exclude for r in by_history],
        )
        by_text = [r for r in retrieve if r.query] if self.text_embeddings else []
        embedded = {id(r): v for r, v in zip(requests, vectors or [None] * len(requests), strict=True)}
        found_t = self.text_retrieved_many(
            [r.query or "" for r in by_text],
            n=[r.n_candidates for r in by_text],
            exclude=[sorted(set(r.history) | set(r.exclude) | self.held_out) for r in by_text],
            vectors=[embedded.get(id(r)) for r in by_text] if vectors is not None else None,
        )
        cands: dict[int, list[int]] = {}
        for r, found in [*zip(by_history, found_h, strict=True), *zip(by_text, found_t, strict=True)]:
            cands[id(r)] = list(dict.fromkeys([*cands.get(id(r), []), *found]))
        return [None if r.candidates == "all" or id(r) not in cands else cands[id(r)] for r in requests]

    def template_for(self, query: str | None) -> str:
        """The template a request renders with by default: prompt.need_template when it carries free text."""
        return self.need_template if query else self.template_name

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """Free texts embedded by the run's text encoder (loaded once, at the first call)."""
        from genrec.retrieval import TextEncoder

        if not self.text_embeddings:
            raise GenrecError("free-text queries need text item embeddings; this run uses collaborative ones")
        if self._encoder is None:
            self._encoder = TextEncoder(self.cfg.ids.encoder)
        return np.asarray(self._encoder.encode(list(texts)))

    def text_retrieved_many(
        self,
        texts: Sequence[str],
        *,
        n: Sequence[int],
        exclude: Sequence[Sequence[int]],
        vectors: Sequence[np.ndarray | None] | None = None,
    ) -> list[list[int]]:
        """The retriever's top-n items for each free text (each with its own n and exclusions; `vectors`: the
        texts already embedded, else embedded here)."""
        if not texts:
            return []
        given = [v for v in vectors or [] if v is not None]
        queries = np.stack(given) if given and len(given) == len(texts) else self.encode_text(texts)
        items, _ = self.retriever.search(queries, max(n), exclude=[list(e) for e in exclude])
        return [row[:k][row[:k] >= 0].tolist() for row, k in zip(items, n, strict=True)]

    def collaborative_candidates(
        self, histories: Sequence[Sequence[int]], *, n: Sequence[int], exclude: Sequence[Sequence[int]]
    ) -> list[list[int]]:
        """`retrieved_many` from the collaborative retriever (retrieval.source markov, itemknn, sasrec, auto, or
        pool: the pooled candidates), or for `union` its top half of each n and then the text retriever's items up
        to n."""
        assert self.collab is not None
        if not all(histories):
            raise GenrecError("candidates=retriever needs a history (or use free text)")
        if not histories:
            return []
        banned = [sorted(set(h) | set(ex)) for h, ex in zip(histories, exclude, strict=True)]
        union = self.cfg.retrieval.source == "union"
        own = [-(-k // 2) if union else k for k in n]
        items, _ = self.collab.search(histories, max(own), exclude=banned)
        out = [row[:k][row[:k] >= 0].tolist() for row, k in zip(items, own, strict=True)]
        if union:
            text = self.retrieved_many(histories, n=n, exclude=exclude)
            for lst, more, k in zip(out, text, n, strict=True):
                have = set(lst)
                lst.extend([i for i in more if i not in have][: k - len(lst)])
        return out

    def _retrieved_scores(
        self, requests: Sequence[RankRequest], retrieved: Sequence[list[int] | None]
    ) -> list[list[float] | None] | None:
        """The collaborative retriever's scores of each request's retrieved candidates, where they are fused."""
        if self.collab is None or not self.fusion_weight:
            return None
        # a request with free text alone has no history for the collaborative model to score: the LM's order
        at = [i for i, c in enumerate(retrieved) if c is not None and requests[i].history]
        if not at:
            return [None] * len(retrieved)
        scored = dict(
            zip(
                at,
                self.collab.scores_of([requests[i].history for i in at], [retrieved[i] or [] for i in at]),
                strict=True,
            )
        )
        return [scored[i].tolist() if i in scored else None for i in range(len(retrieved))]

    def _tries(self, requests: Sequence[RankRequest], retrieved: Sequence[list[int] | None]) -> list[Trie]:
        out = []
        for r, cands in zip(requests, retrieved, strict=True):
            if cands is None:  # mode `all`: shares every untouched subtree with the catalogue trie
                banned = sorted(set(r.history) | set(r.exclude) | self.held_out)
                out.append(self._all.without(self.item_tokens[banned].tolist()))
            else:  # catalogue items have distinct ID sequences (checked when the catalogue trie was built)
                out.append(Trie.from_array(self.item_tokens[cands], cands, distinct=True))
        return out

    # -- ranking ---------------------------------------------------------------------------------
    @property
    def builder(self) -> PromptBuilder:
        """The prompt builder of the run's template at its active version."""
        return self.builder_for(None)

    def pin_template(self, template: str | None, version: int | None = None) -> TemplateVersion:
        """A saved version of `template` (None: the run's); by default the one active now."""
        name = template or self.template_name
        return self.templates.active(name) if version is None else self.templates.version(name, version)

    def builder_for(self, template: str | None, version: int | None = None) -> PromptBuilder:
        """A prompt builder for a template (None: the run's) at a version (None: the active one).

        Versions are immutable, so builders are cached by (name, version); activating another
        version changes what the next call returns without a restart.
        """
        v, t = self.templates.template(template or self.template_name, version)
        key = (v.name, v.version)
        if key not in self._builders:
            self._builders[key] = self.builder_with(t)
        return self._builders[key]

    def builder_with(self, template: PromptTemplate) -> PromptBuilder:
        """A prompt builder for an unsaved template (editor previews); not cached."""
        return PromptBuilder.for_config(template, self.catalog, self.ids, self.cfg.prompt)

    def rank_requests(self, requests: Sequence[RankRequest]) -> list[list[Recommendation]]:
        """One batched constrained ranking for requests with their own options (`prepare`, then
        `rank_prepared`). The beam width is the largest any request needs, so each gets at least its own."""
        return self.rank_prepared(requests, self.prepare(requests))

    def prepare(self, requests: Sequence[RankRequest]) -> PreparedBatch:
        """The CPU side of ranking a batch: prompts rendered (where not already) and tokenized, candidates
        retrieved. Needs no model, so genrec.prep runs it in worker processes for batch jobs."""
        builders: dict[tuple[str | None, int | None], PromptBuilder] = {}
        with self.clock.stage("render"):
            for r in requests:
                if r.messages is None:
                    key = (r.template or self.template_for(r.query), r.template_version)
                    if key not in builders:
                        builders[key] = self.builder_for(*key)
                    r.messages = builders[key].messages(r.history, r.user, query=r.query)
        with self.clock.stage("tokenise"):
            prompts = self.engine.encode_many([r.messages or [] for r in requests])
        with self.clock.stage("retrieve"):
            vectors = self._text_vectors(requests)
            retrieved = self._retrieve(requests, vectors)
            self._check_fusion(retrieved)
            scores = self._retrieved_scores(requests, retrieved)
        return PreparedBatch(prompts, retrieved, retrieved_scores=scores, text_vectors=vectors)

    def _text_vectors(self, requests: Sequence[RankRequest]) -> list[np.ndarray | None] | None:
        """Each request's free text embedded (one encoder call for the batch); None when none carries text or
        the run's item embeddings are not text."""
        at = [i for i, r in enumerate(requests) if r.query] if self.text_embeddings else []
        if not at:
            return None
        found = dict(zip(at, self.encode_text([requests[i].query or "" for i in at]), strict=True))
        return [found.get(i) for i in range(len(requests))]

    def rank_prepared(
        self, requests: Sequence[RankRequest], prepared: PreparedBatch
    ) -> list[list[Recommendation]]:
        """Rank a batch `prepare` has made ready (here or in a worker process): tries, then the engine."""
        return self.launch_prepared(requests, prepared)()

    def launch_prepared(
        self, requests: Sequence[RankRequest], prepared: PreparedBatch
    ) -> Callable[[], list[list[Recommendation]]]:
        """`rank_prepared` in two steps (Engine.launch): start ranking the batch, and return a call that waits
        for it and gives the recommendations. A request with a tree layout from a worker needs no trie."""
        if not requests:
            return list
        prompts = prepared.prompts
        for r, p in zip(requests, prompts, strict=True):
            r.prompt_tokens = len(p)
        with self.clock.stage("layout"):
            tries, lays = self._tries_and_layouts(requests, prepared)
        width = max(max(r.beam_width or r.n_items, r.n_items) for r in requests)
        if prepared.retrieved_scores is not None:  # every candidate's LM score, to fuse (`fused`)
            width = max([width, *(len(c) for c in prepared.retrieved if c is not None)])
        width = max(width, self._text_width(prepared))
        with self.clock.stage("rank"):
            ranked = self.engine.launch(prompts, tries, beam_width=width, layouts=lays)

        def finish() -> list[list[Recommendation]]:
            with self.clock.stage("rank"):
                done = ranked()
            with self.clock.stage("results"):
                return self.recommendations(requests, self.fused(done, prepared))

        return finish

    def _check_fusion(self, retrieved: Sequence[list[int] | None]) -> None:
        if self.collab is not None and self.fusion_weight is None and any(c is not None for c in retrieved):
            raise GenrecError(
                f"{self.run.path}: retrieval.fusion_weight is auto and no weight has been chosen yet: run "
                f"`genrec train --run {self.run.path}` (it chooses one on the validation split), `genrec evaluate`, "
                "or set retrieval.fusion_weight to a number"
            )

    def _text_width(self, prepared: PreparedBatch) -> int:
        """How many items the engine returns so that a request's free text can reorder them (`fused`): every
        retrieved candidate, or with candidates=all the first RankingOptions.MAX_ITEMS where the engine can score
        exactly (tree scoring; a beam search keeps its own width); 0 without text. Set by the text alone, not by
        its weight, so that a weight chosen later reorders the same items."""
        if prepared.text_vectors is None:
            return 0
        policy = getattr(self.engine, "layout_policy", None)
        whole = RankingOptions.MAX_ITEMS if policy is not None else 0
        return max(
            len(c) if c is not None else whole
            for c, v in zip(prepared.retrieved, prepared.text_vectors, strict=True)
            if v is not None
        )

    def fused(self, ranked: Sequence[Ranked], prepared: PreparedBatch) -> list[Ranked]:
        """Each request's candidates reordered by the fused score: the LM's log-probability + the
        retrieval.fusion_weight x log-softmax of the collaborative scores over its candidates + for a request
        with free text the retrieval.text_weight x log-softmax of the text's cosine with each candidate's
        embedding. Requests with neither keep the LM's order."""
        coll_w, text_w = self.fusion_weight or 0.0, self.text_weight or 0.0
        if self.text_weight is None and prepared.text_vectors is not None and not self._said_text_weight:
            self._said_text_weight = True
            logger.warning(
                "%s: retrieval.text_weight is auto and no weight has been chosen yet, so free text reaches the LM "
                "alone: `genrec train` or `genrec evaluate --protocol need` chooses one on the validation split",
                self.run.path,
            )
        colls = prepared.retrieved_scores if coll_w else None
        texts = prepared.text_vectors if text_w else None
        if colls is None and texts is None:
            return list(ranked)
        out = []
        for k, (r, cands) in enumerate(zip(ranked, prepared.retrieved, strict=True)):
            coll = colls[k] if colls is not None and cands is not None else None
            vec = texts[k] if texts is not None else None
            if coll is None and vec is None:
                out.append(r)
                continue
            scores = np.asarray(r.scores, dtype=np.float64)
            if coll is not None and cands is not None:
                by_item = dict(zip(cands, coll, strict=True))
                scores = fuse(scores, np.asarray([by_item[i] for i in r.items]), coll_w)
            if vec is not None:
                scores = fuse(scores, self.text_cosines(vec, r.items), text_w)
            order = np.argsort(-scores, kind="stable")
            out.append(Ranked([r.items[j] for j in order], [float(scores[j]) for j in order]))
        return out

    def text_cosines(self, vector: np.ndarray, items: Sequence[int]) -> np.ndarray:
        """An embedded free text's cosine with each item's (normalised) embedding."""
        return np.asarray(self.retriever.embeddings[list(items)] @ np.asarray(vector, dtype=np.float32))

    def _tries_and_layouts(
        self, requests: Sequence[RankRequest], prepared: PreparedBatch
    ) -> tuple[list[Trie | None], list[TreeLayout | None] | None]:
        """The engine's inputs besides prompts: candidate tries, and tree layouts where the engine scores
        exactly (made here unless a worker made them, so that their CPU time counts as `layout`, not `rank`).
        A request with a layout needs no trie (None)."""
        lays = prepared.layouts
        policy = getattr(self.engine, "layout_policy", None)
        if lays is None:
            every = self.prepared_tries(requests, prepared)
            if policy is None:
                return list(every), None
            from genrec.engines.hf import tree_layouts

            search, max_tree_tokens = policy  # this engine's layout_policy, as genrec.prep's workers apply it
            found = tree_layouts(every, search, max_tree_tokens)
            return [None if i in found else t for i, t in enumerate(every)], [
                found.get(i) for i in range(len(every))
            ]
        # layouts made by a worker for this engine's layout_policy (genrec.prep); tries for the rest
        need = [i for i, lay in enumerate(lays) if lay is None]
        made = iter(self._tries([requests[i] for i in need], [prepared.retrieved[i] for i in need]))
        return [next(made) if lay is None else None for lay in lays], lays

    def recommendations(
        self, requests: Sequence[RankRequest], ranked: Sequence[Ranked]
    ) -> list[list[Recommendation]]:
        """Each request's first `n_items` ranked items as catalogue recommendations."""
        return [
            [
                Recommendation(i, self.catalog.item_ids[i], self.catalog.titles[i], s)
                for i, s in zip(out.items[: r.n_items], out.scores[: r.n_items], strict=True)
            ]
            for r, out in zip(requests, ranked, strict=True)
        ]

    def rank_stream(
        self, batches: Iterable[tuple[T, list[RankRequest], PreparedBatch]]
    ) -> Iterator[tuple[T, list[RankRequest], list[list[Recommendation]]]]:
        """Each prepared (tag, batch) with its recommendations, in order, one batch ahead: batch i + 1 is
        launched before batch i is read, so the device ranks while the caller writes i's results and the
        next batch is fetched and packed (the batch job and `evaluate` rank through this)."""
        pending: tuple[T, list[RankRequest], Callable[[], list[list[Recommendation]]]] | None = None
        for tag, reqs, prepared in batches:
            launched = (tag, reqs, self.launch_prepared(reqs, prepared))
            if pending is not None:
                yield pending[0], pending[1], pending[2]()
            pending = launched
        if pending is not None:
            yield pending[0], pending[1], pending[2]()

    def rank_histories(
        self,
        histories: Sequence[Sequence[int]],
        options: RankingOptions | None = None,
        **per_history: Any,
    ) -> list[list[Recommendation]]:
        """Top `options.n_items` per history (None: the run's defaults, RunConfig.ranking; `per_history`:
        history_requests' users, exclude, queries); every item is in its candidate set, none repeats or was
        seen."""
        return self.rank_requests(history_requests(histories, options or self.cfg.ranking, **per_history))

    def retrieve_text(self, text: str, *, n_items: int, exclude: Sequence[int] = ()) -> list[Recommendation]:
        """The retriever alone on a free text's embedding (no model): the cold-start baseline."""
        items, scores = self.retriever.search(self.encode_text([text]), n_items, exclude=[list(exclude)])
        return [
            Recommendation(int(i), self.catalog.item_ids[i], self.catalog.titles[i], float(s))
            for i, s in zip(items[0], scores[0], strict=True)
            if i >= 0
        ]


def load_retrieval(
    run: RunDir, cfg: RunConfig, *, text: Retriever | None = None
) -> tuple[CollaborativeRetriever | None, float | None]:
    """The run's collaborative retriever (retrieval.source; None for `text`) and its fusion weight: the
    configured number, or for `auto` the one recorded in run.json for this retriever (None: not chosen yet).
    retrieval.source=auto loads the model `genrec train` chose (run.json's `retrieval.collaborative`); `pool`
    loads every model of retrieval.auto_models (and `text`, the run's text retriever, loaded here when None, for
    retrieval.pool_text) around that one, whose score is fused."""
    r = cfg.retrieval
    recorded = run.meta().get("retrieval", {})
    kind = collaborative_kind(r.source, r.collaborative, chosen=recorded.get("collaborative"))
    if kind is None:
        return None, 0.0
    try:
        models = {k: load_collaborative(run.retriever_dir, k) for k in dict.fromkeys([kind, *pooled(cfg)])}
    except FileNotFoundError as e:
        raise GenrecError(
            f"{e.args[0]} is missing: retrieval.source={r.source} needs the {kind} retriever, which "
            f"`genrec train --run {run.path}` trains (or set retrieval.source=text)"
        ) from None
    collab = models[kind]
    if r.source == "pool":
        members = [models[k] for k in r.auto_models]
        if r.pool_text:
            members.append(TextScores(text or Retriever(run.load_embeddings())))
        collab = PooledRetriever(members, scorer=models[kind])
    weight = r.fusion_weight
    if weight != "auto":
        return collab, float(weight)
    chosen = recorded.get("fusion")
    return collab, float(chosen["weight"]) if chosen else None


def text_weight_of(run: RunDir, cfg: RunConfig) -> float | None:
    """The weight of a request's free-text score (retrieval.text_weight): the configured number, or for `auto` the
    one recorded in run.json (`retrieval.text_fusion`; None: not chosen yet)."""
    w = cfg.retrieval.text_weight
    if w != "auto":
        return float(w)
    chosen = run.meta().get("retrieval", {}).get("text_fusion")
    return float(chosen["weight"]) if chosen else None


def pooled(cfg: RunConfig) -> list[str]:
    """The collaborative models retrieval.source=pool pools (none for another source)."""
    return list(cfg.retrieval.auto_models) if cfg.retrieval.source == "pool" else []
