"""The recommendation service behind the HTTP API: input parsing, micro-batching, limits, metrics.

Knows nothing of HTTP: it raises APIError values that the app maps to status codes. The engine
is driven by one worker task that batches concurrent requests into one ranking call (several tasks
when the engine batches concurrent calls itself, as AsyncLLM does).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import logging
import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily

from genrec.config import RankingOptionError, RankingOptions
from genrec.cpu_time import StageClock
from genrec.evaluation.metrics import validity
from genrec.recommender import (
    QueryProblem,
    RankRequest,
    Recommendation,
    Recommender,
    UnknownItems,
    UserQuery,
    history_requests,
)
from genrec.serve.protocol import APIError, RecommendationOptions, RecommendedItem
from genrec.templates.prompt_store import TemplateNotFound, TemplateVersion
from genrec.templates.prompt_worker import shared_worker
from genrec.templates.prompts import PromptTemplate, TemplateProblem

logger = logging.getLogger(__name__)

ID_TOKEN = re.compile(r"<[a-z]+_\d+>")
SPLIT = re.compile(r"[\n,;]+")


@dataclass
class ServeLimits:
    max_history: int = 512
    """Longest history a request may carry (items)."""
    max_queue: int = 256
    """Requests waiting for the engine before new ones get 429."""
    max_batch: int = 32
    """Requests ranked together in one engine call."""
    batch_wait_ms: float = 5.0
    """How long the worker may wait to fill a batch."""
    adaptive_wait: bool = True
    """Wait only while requests arrive less than batch_wait_ms apart (the median of the last 8 gaps): a
    lone client's request starts at once, busy traffic still fills batches. False: always wait."""
    request_timeout_s: float = 60.0
    """A request still waiting after this gets 503."""
    concurrent_batches: int = 4
    """Batches in flight at once when the engine allows it (AsyncLLM); the transformers engine runs one."""
    template_recheck_s: float = 0.5
    """How long the template store trusts its last look at a template's files on disk: within it, a request's
    template lookup makes no file-system call. Saves through this server are seen at once, saves by another
    process (`genrec prompts`) within this time. 0: look at the disk for every request."""
    warmup_requests: int = 0
    """Requests ranked at start-up, before the server accepts connections: the run's own users as default
    requests, in batches of 1, 2, 4 and 8, so that the first clients do not pay one-time costs (on a GPU
    the transformers engine captures a CUDA graph per batch shape at its first use). `genrec serve`: 32."""


def timed_out(limits: ServeLimits) -> APIError:
    """The 503 of a request still waiting for the engine after limits.request_timeout_s."""
    return APIError(
        503,
        f"timed out after {limits.request_timeout_s:.0f} s",
        type="timeout",
        code="timeout",
        headers={"Retry-After": "5"},
    )


@dataclass
class Query:
    """What a request asks for, after parsing: a history, or free text for cold start."""

    history: list[int] = field(default_factory=list)
    text: str | None = None
    user: str | None = None
    exclude: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    """Set once ranked: the prompt's length in tokens."""
    template: TemplateVersion | None = None
    """The template version the prompt was rendered with (pinned at admission)."""
    messages: list[dict[str, str]] | None = None
    options: RankingOptions = field(default_factory=RankingOptions)
    """How it is ranked: the run's defaults with the request's fields applied (RecService.ranking)."""
    explore: float = 0.0
    """> 0: rank twice options.n_items and diversify them (RecService.diversify)."""


class _RankedBy:
    """Exposes the engine's own count of requests ranked by each search (exact tree scoring or beam)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def collect(self) -> Any:
        family = CounterMetricFamily(
            "genrec_ranked_requests",
            "Requests ranked, by search: exact (tree scoring) or beam",
            labels=["search"],
        )
        for search, n in sorted(getattr(self.engine, "ranked_by", {}).items()):
            family.add_metric([search], n)
        yield family


class _StageCPU:
    """Exposes the recommender's CPU seconds by stage (genrec.cpu_time): divided by the requests served, the
    CPU a request costs in each stage."""

    def __init__(self, clock: StageClock) -> None:
        self.clock = clock

    def collect(self) -> Any:
        family = CounterMetricFamily(
            "genrec_stage_cpu_seconds", "Server CPU seconds by stage of the requests' work", labels=["stage"]
        )
        for stage, seconds in self.clock.seconds().items():
            family.add_metric([stage], seconds)
        yield family


class Metrics:
    def __init__(self, engine: Any = None, *, clock: StageClock | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        if engine is not None:
            r.register(_RankedBy(engine))
        if clock is not None:
            r.register(_StageCPU(clock))
        ProcessCollector(registry=r)  # process_cpu_seconds_total: the whole server's CPU, every thread
        self.engine_busy = Counter(
            "genrec_engine_busy_seconds", "Wall seconds the engine worker spent ranking batches", registry=r
        )
        self.requests = Counter("genrec_requests_total", "HTTP requests", ["endpoint", "status"], registry=r)
        self.latency = Histogram(
            "genrec_request_latency_seconds",
            "Request latency",
            ["endpoint"],
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.prompt_tokens = Counter("genrec_prompt_tokens_total", "Prompt tokens processed", registry=r)
        self.completion_tokens = Counter("genrec_completion_tokens_total", "ID tokens generated", registry=r)
        self.queue_depth = Gauge("genrec_queue_depth", "Requests waiting for the engine", registry=r)
        self.batch_size = Histogram(
            "genrec_batch_size",
            "Requests per engine batch",
            registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
        )
        self.items = Counter("genrec_items_returned_total", "Items returned", registry=r)
        self.invalid = Counter("genrec_invalid_items_total", "Returned items that were not valid", registry=r)


@dataclass
class _Job:
    request: RankRequest
    future: asyncio.Future[list[Recommendation]]


class RecService:
    def __init__(self, rec: Recommender, *, model_name: str, limits: ServeLimits | None = None) -> None:
        self.rec = rec
        self.model_name = model_name
        self.limits = limits or ServeLimits()
        self.metrics = Metrics(rec.engine, clock=rec.clock)
        rec.templates.recheck_s = self.limits.template_recheck_s
        self._queue: asyncio.Queue[_Job] | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._pending = 0
        self._last_arrival: float | None = None
        self._gaps_ms: collections.deque[float] = collections.deque(maxlen=8)
        """The last gaps between admitted requests."""
        self.warmed: dict[str, Any] | None = None
        """What the start-up warm-up did (ServeLimits.warmup_requests), once it ran."""

    @property
    def queue_depth(self) -> int:
        """Requests admitted and not answered yet (queued or being ranked)."""
        return self._pending

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.limits.warmup_requests > 0:
            self.warmed = await asyncio.to_thread(self.warm_up, self.limits.warmup_requests)
        self._queue = asyncio.Queue()
        n = self.limits.concurrent_batches if getattr(self.rec.engine, "concurrent", False) else 1
        self._workers = [asyncio.create_task(self._work()) for _ in range(max(1, n))]

    def warm_up(self, n: int) -> dict[str, Any]:
        """Rank `n` of the run's users (their whole histories, the request defaults) in batches of 1, 2, 4
        and 8, in turn; what it did (and the CUDA graphs captured by then, on a GPU) is logged and returned."""
        users = list(itertools.islice(itertools.cycle(self.rec.data.users), n))
        histories = [self.rec.user_history(u, split="full")[-self.limits.max_history :] for u in users]
        requests = history_requests(histories, self.rec.cfg.ranking, users=users)  # a request's defaults
        sizes: list[int] = []
        started = time.perf_counter()
        for size in itertools.cycle((1, 2, 4, 8)):
            batch = requests[sum(sizes) : sum(sizes) + size]
            if not batch:
                break
            self.rec.rank_requests(batch)
            sizes.append(len(batch))
        static = getattr(self.rec.engine, "static", None)
        out = {
            "requests": n,
            "batches": sizes,
            "seconds": round(time.perf_counter() - started, 2),
            "cuda_graphs": None if static is None else static.captured,
        }
        logger.info("warm-up: %s", out)
        return out

    async def stop(self, *, drain_s: float = 30.0) -> None:
        """Finish queued requests (up to drain_s), then stop the worker."""
        deadline = time.monotonic() + drain_s
        while self._pending and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for w in self._workers:
            w.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await w

    # -- parsing ---------------------------------------------------------------------------------
    def resolve(self, refs: Sequence[str], *, param: str) -> list[int]:
        try:
            return self.rec.resolve_items(refs)
        except UnknownItems as e:
            raise APIError(
                400,
                f"unknown item(s) in {param}: {', '.join(map(repr, e.unknown[:20]))}",
                param=param,
                code="unknown_items",
            ) from None

    def parse(self, opts: RecommendationOptions, *, text: str, user: str | None) -> Query:
        """History from `history`, else a known `user`, else the message text (item ids or titles, or a new
        user's request in words); free text beside a history is the user's need and goes into the prompt with
        it (Recommender.resolve_query, the resolution every front end shares). The ranking options are the
        run's defaults with the request's fields applied."""
        given = opts.history is not None
        history: Sequence[str] | None = opts.history
        need: str | None = text
        if not given and not (user is not None and self.rec.knows_user(user)):
            history, need = self.parse_text(text)
        resolved = self.resolve_query(
            user=user, history=history, text=need, strict_user=given, from_messages=not given
        )
        return Query(
            history=resolved.history,
            text=resolved.text,
            user=user,
            exclude=self.resolve(opts.exclude, param="exclude") if opts.exclude else [],
            options=self.ranking(opts),
            explore=opts.explore,
        )

    def resolve_query(
        self,
        *,
        user: str | None,
        history: Sequence[str] | None,
        text: str | None = None,
        strict_user: bool = True,
        from_messages: bool = False,
    ) -> UserQuery:
        """Recommender.resolve_query within this server's history limit, its problems as 400s naming the
        request's parameter (`messages` for what came from the message text)."""
        try:
            return self.rec.resolve_query(
                user=user,
                history=history,
                text=text,
                strict_user=strict_user,
                max_history=self.limits.max_history,
            )
        except QueryProblem as e:
            param = "messages" if from_messages and e.field in ("history", "text") else e.field
            raise APIError(400, str(e), param=param, code=e.code) from None

    def ranking(self, opts: RecommendationOptions) -> RankingOptions:
        """The run's default ranking options with the request's fields applied."""
        try:
            return self.rec.cfg.ranking.with_(
                n_items=opts.n_items, candidates=opts.candidates, n_candidates=opts.n_candidates
            )
        except RankingOptionError as e:
            raise APIError(400, str(e), param=e.field) from None

    def parse_text(self, text: str) -> tuple[list[str] | None, str | None]:
        """ID strings, or lines/commas that are all item ids or titles -> (those items, None); none -> (None,
        the text as a new user's request)."""
        body = re.sub(r"^\s*(history|items)\s*:\s*", "", text.strip(), flags=re.I)
        tokens = ID_TOKEN.findall(body)
        if tokens:  # item ID strings, possibly back to back: one item per `depth` tokens
            d = self.rec.ids.depth
            if len(tokens) % d:
                raise APIError(
                    400,
                    f"{len(tokens)} ID tokens do not form whole item IDs of {d} tokens",
                    param="messages",
                    code="unknown_items",
                )
            refs = ["".join(tokens[k : k + d]) for k in range(0, len(tokens), d)]
            self.resolve(refs, param="messages")  # names the unknown ones
            return refs, None
        parts = [p.strip() for p in SPLIT.split(body) if p.strip()]
        known = 0
        for p in parts:
            with contextlib.suppress(UnknownItems):
                self.rec.resolve_items([p])
                known += 1
        if parts and known == len(parts):
            return parts, None
        if known or all(self.looks_like_item_id(p) for p in parts):
            # some parts are items, others are not, or every part is shaped like this catalogue's ids
            # (`I99999`): name the unknown ones rather than take them for a description
            self.resolve(parts, param="messages")
        return None, text

    def looks_like_item_id(self, text: str) -> bool:
        """Shaped like one of this catalogue's item ids: the same letters and punctuation, with digits
        where an id has digits (`I99999` for `I00012`); text without a digit never is."""
        return any(c.isdigit() for c in text) and _id_shape(text) in self._id_shapes

    @functools.cached_property
    def _id_shapes(self) -> frozenset[str]:
        return frozenset(_id_shape(i) for i in self.rec.catalog.item_ids if any(c.isdigit() for c in i))

    # -- ranking ---------------------------------------------------------------------------------
    async def recommend(self, q: Query, template: str | None = None) -> list[Recommendation]:
        """Rank a parsed query: its template version pinned now, at admission (`template`, None: the run's), then
        queued for the engine, whose batch renders it off the event loop (a render may take up to its time limit;
        `_rank_batch`), so that a request costs no thread hand-off of its own."""
        if q.messages is None:
            self.pin(q, template)
        req = self.rank_request(q)
        try:
            recs = await self._submit(req)
        except (
            TemplateNotFound,
            TemplateProblem,
        ) as e:  # a front-end's engine core renders in its own thread
            raise template_error(e) from None
        q.prompt_tokens, q.messages = req.prompt_tokens, req.messages
        self.metrics.prompt_tokens.inc(req.prompt_tokens)
        if q.explore > 0:
            recs = self.diversify(recs, q.options.n_items, q.explore)
        self._count(recs, q)
        return recs

    @staticmethod
    def rank_request(q: Query) -> RankRequest:
        """The RankRequest of a parsed, rendered query (twice the items when `explore` diversifies them)."""
        options = q.options.with_(n_items=2 * q.options.n_items) if q.explore > 0 else q.options
        pinned = q.template if q.messages is None else None
        return RankRequest(
            q.history,
            options,
            user=q.user,
            exclude=q.exclude,
            messages=q.messages,
            query=q.text,
            template=pinned.name if pinned else None,
            template_version=pinned.version if pinned else None,
        )

    def pin(self, q: Query, template: str | None) -> None:
        """Pin the version of `template` (None: the one for the query) active now: the request renders with it
        even if another version is activated before the engine reaches it. No file-system call within
        ServeLimits.template_recheck_s."""
        try:
            q.template = self.rec.pin_template(template or self.rec.template_for(q.text))
        except TemplateNotFound as e:
            raise template_error(e) from None

    def render(
        self,
        q: Query,
        template: str | None,
        *,
        version: int | None = None,
        draft: PromptTemplate | None = None,
        isolated: bool = False,
    ) -> None:
        """Render the prompt now: with a saved version (default: the one active at admission) or an
        unsaved `draft`. A request in flight keeps its prompt when another version is activated.
        `isolated`: in the render worker process (genrec.templates.prompt_worker), for templates not checked yet."""
        try:
            if draft is None:
                q.template = self.rec.pin_template(template or self.rec.template_for(q.text), version)
                builder = self.rec.builder_for(q.template.name, q.template.version)
            else:
                builder = self.rec.builder_with(draft)
            if isolated:
                variables = builder.variables(q.history, q.user, query=q.text)
                q.messages = shared_worker().render(builder.template, [variables])[0]
            else:
                q.messages = builder.messages(q.history, q.user, query=q.text)
        except (TemplateNotFound, TemplateProblem) as e:
            raise template_error(e, status=422 if draft is not None else 400) from None

    async def _submit(self, req: RankRequest) -> list[Recommendation]:
        assert self._queue is not None, "start() first"
        if self._pending >= self.limits.max_queue:
            raise APIError(
                429,
                f"server busy: {self._pending} requests queued",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[Recommendation]] = loop.create_future()
        self._note_arrival(time.monotonic())
        self._pending += 1
        self.metrics.queue_depth.set(self._pending)
        self._queue.put_nowait(_Job(req, fut))  # unbounded: admission is bounded by max_queue above
        # one timer, not wait_for(shield(...)) (two more futures and a task's wake-ups a request): a request
        # still waiting when it fires gets the 503; the worker does not rank a job whose future is done
        timer = loop.call_later(self.limits.request_timeout_s, _expire, fut, self.limits)
        try:
            return await fut
        finally:
            timer.cancel()

    def _note_arrival(self, now: float) -> None:
        if self._last_arrival is not None:
            self._gaps_ms.append(1000 * (now - self._last_arrival))
        self._last_arrival = now

    def _should_wait(self) -> bool:
        return hold_batch_open(self._gaps_ms, self.limits)

    async def _work(self) -> None:
        assert self._queue is not None
        while True:
            jobs = [await self._queue.get()]
            while len(jobs) < self.limits.max_batch and not self._queue.empty():  # whatever is queued now
                jobs.append(self._queue.get_nowait())
            deadline = time.monotonic() + (self.limits.batch_wait_ms / 1000 if self._should_wait() else 0)
            while len(jobs) < self.limits.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    jobs.append(await asyncio.wait_for(self._queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            self.metrics.batch_size.observe(len(jobs))
            busy = time.perf_counter()
            live = [j for j in jobs if not j.future.done()]  # not those answered 503 or given up: not ranked
            try:
                results = await asyncio.to_thread(self._rank_batch, [j.request for j in live]) if live else []
            except Exception as e:  # one bad batch must not kill the worker; each waiter gets the error
                logger.exception("engine batch failed")
                for j in live:
                    if not j.future.done():
                        j.future.set_exception(e)
            else:
                for j, r in zip(live, results, strict=True):
                    if j.future.done():
                        continue
                    if isinstance(r, APIError):
                        j.future.set_exception(r)
                    else:
                        j.future.set_result(r)
            finally:
                self.metrics.engine_busy.inc(time.perf_counter() - busy)
                self._pending -= len(jobs)
                self.metrics.queue_depth.set(self._pending)

    def _rank_batch(self, requests: list[RankRequest]) -> list[list[Recommendation] | APIError]:
        """In the engine's thread: render the prompts of the requests admitted without one (each with the template
        version pinned at admission), then rank those that rendered in one call. A template that fails to render
        fails its own request (a 400), never the batch."""
        out: list[list[Recommendation] | APIError] = []
        ready: list[RankRequest] = []
        with self.rec.clock.stage("render"):
            for r in requests:
                try:
                    if r.messages is None:
                        builder = self.rec.builder_for(r.template, r.template_version)
                        r.messages = builder.messages(r.history, r.user, query=r.query)
                except (TemplateNotFound, TemplateProblem) as e:
                    out.append(template_error(e))
                else:
                    out.append([])
                    ready.append(r)
        ranked = iter(self.rec.rank_requests(ready) if ready else [])
        return [r if isinstance(r, APIError) else next(ranked) for r in out]

    def diversify(self, recs: list[Recommendation], n: int, explore: float) -> list[Recommendation]:
        """Maximal marginal relevance: relevance (softmax of scores) vs similarity to items already picked."""
        if len(recs) <= 1:
            return recs[:n]
        emb = self.rec.retriever.embeddings[[r.item for r in recs]]
        scores = np.array([r.score for r in recs])
        rel = np.exp(scores - scores.max())
        rel = rel / rel.max()
        picked: list[int] = []
        left = list(range(len(recs)))
        while left and len(picked) < n:
            sim = (emb[left] @ emb[picked].T).max(axis=1) if picked else np.zeros(len(left))
            best = int(np.argmax((1 - explore) * rel[left] - explore * sim))
            picked.append(left.pop(best))
        return [recs[i] for i in picked]

    def _count(self, recs: list[Recommendation], q: Query) -> None:
        items = [r.item for r in recs]
        good = round(validity(items, [*q.history, *q.exclude], len(self.rec.catalog)) * len(items))
        self.metrics.items.inc(len(items))
        self.metrics.invalid.inc(len(items) - good)
        self.metrics.completion_tokens.inc(len(items) * self.rec.ids.depth)

    def template_info(self, name: str, hash: str, version: int | None = None) -> dict[str, Any]:
        """A template's name, version (None: unsaved) and hash, and whether the model was trained with it."""
        trained = self.rec.trained_template.get("hash")
        return {
            "name": name,
            "version": version,
            "hash": hash,
            "trained_hash": trained,
            "matches_training": hash == trained,
        }


def _expire(fut: asyncio.Future[Any], limits: ServeLimits) -> None:
    if not fut.done():
        fut.set_exception(timed_out(limits))


def template_error(e: TemplateNotFound | TemplateProblem, *, status: int = 400) -> APIError:
    """The API error of a template that is not there (400) or fails to render (`status`, with its line)."""
    if isinstance(e, TemplateNotFound):
        return APIError(400, str(e), param="template", code="template_not_found")
    return APIError(status, str(e), param="template", code="template_error", line=e.line, column=e.column)


def hold_batch_open(gaps_ms: Sequence[float], limits: ServeLimits) -> bool:
    """Hold a batch open for more requests? Adaptive: only while the median of the last 8 gaps between
    arrivals (`gaps_ms`) is under the window (a burst after a pause counts after a few arrivals; one slow gap
    in a busy stream does not stop the waiting). The engine core of `genrec serve --frontends N` batches by
    the same rule (genrec.serve.engine_core)."""
    if not limits.adaptive_wait:
        return True
    return bool(gaps_ms) and statistics.median(gaps_ms) < limits.batch_wait_ms


def _id_shape(text: str) -> str:
    return re.sub(r"\d", "0", text.strip())


def recommended_items(recs: Sequence[Recommendation]) -> list[RecommendedItem]:
    """The wire form of a ranked list (rank from 1, scores rounded)."""
    return [
        RecommendedItem(rank=k, item_id=r.item_id, title=r.title, score=round(r.score, 6))
        for k, r in enumerate(recs, 1)
    ]
