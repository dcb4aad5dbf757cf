"""The engine core of `genrec serve --frontends N`: one process ranks, N front-end processes do the rest.

The single-process server renders, tokenises, retrieves, lays out tries and encodes responses in the same
process (and under the same GIL) as the model; on a 16-core GPU host that caps it far below the engine's own
throughput (issue 26). Here, as vLLM splits its API server from its engine core, each front-end process
(genrec.serve.frontends) parses, renders at admission (so it pins the template version), prepares the request
(`genrec.prep.prepare_with_layouts`: prompt ids, retrieved candidates, tree layouts, collaborative scores) and
sends it over a pipe; the `EngineCore`, in the process that owns the model, micro-batches the prepared requests
of every front-end exactly as `RecService._work` does (max_batch, batch_wait_ms, the adaptive window) and ranks
each batch with `Recommender.rank_prepared`, the batch job's path.

Owns the wire protocol between the two sides (plain tuples of picklable values over a
`multiprocessing.connection.Connection`), the core's counters and how a front-end exposes them on /metrics.
Knows nothing of HTTP beyond the APIError values `RemoteService` raises; process management lives in
genrec.serve.frontends.

Messages, front-end -> core: ("rank", 0, [(rid, RankRequest, PreparedBatch of one), ...], stage seconds, process
CPU s) and ("stats", rid). Core -> front-end: ("done", rid, recommendations), ("failed", rid, message),
("full", rid, queue depth) and ("stats", rid, snapshot).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import functools
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from genrec.cpu_time import STAGES
from genrec.prep import prepare_with_layouts
from genrec.recommender import PreparedBatch, RankRequest, Recommendation, Recommender
from genrec.serve.protocol import APIError
from genrec.serve.service import Metrics, RecService, ServeLimits, hold_batch_open, timed_out

logger = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
"""genrec_batch_size's buckets (as the single-process server's Metrics)."""


def split_prepared(batch: PreparedBatch) -> list[PreparedBatch]:
    """A PreparedBatch of n requests as n batches of one (each ranked in whatever batch the core makes)."""
    n = len(batch.prompts)

    def at(values: list[Any] | None, i: int) -> list[Any] | None:
        return None if values is None else [values[i]]

    return [
        PreparedBatch(
            prompts=[batch.prompts[i]],
            retrieved=[batch.retrieved[i]],
            layouts=at(batch.layouts, i),
            retrieved_scores=at(batch.retrieved_scores, i),
            text_vectors=at(batch.text_vectors, i),
        )
        for i in range(n)
    ]


def merge_prepared(parts: Sequence[PreparedBatch]) -> PreparedBatch:
    """One PreparedBatch of several, in order (each front-end prepares its requests on its own). Layouts,
    collaborative scores and text vectors stay None only where no part has them; a part without them contributes
    None entries (its requests get tries made here, or keep the LM's order)."""

    def joined(field: str) -> list[Any] | None:
        lists = [getattr(p, field) for p in parts]
        if all(x is None for x in lists):
            return None
        return [
            v
            for p, x in zip(parts, lists, strict=True)
            for v in (x if x is not None else [None] * len(p.prompts))
        ]

    return PreparedBatch(
        prompts=[ids for p in parts for ids in p.prompts],
        retrieved=[c for p in parts for c in p.retrieved],
        layouts=joined("layouts"),
        retrieved_scores=joined("retrieved_scores"),
        text_vectors=joined("text_vectors"),
    )


@dataclass
class _Frontend:
    """One attached front-end: its pipe, the lock its replies are sent under, and what it last reported.
    A restarted front-end gets a new record at the same index; jobs of the dead one keep the old record, so
    their replies go to its closed pipe (dropped), never to the new process, whose request ids start over."""

    conn: Connection
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    pid: int | None = None
    stages: dict[str, float] = dataclasses.field(default_factory=dict)
    cpu: float = 0.0
    gone: bool = False


@dataclass
class _Job:
    frontend: _Frontend
    rid: int
    request: RankRequest
    prepared: PreparedBatch


class EngineCore:
    """Ranks the prepared requests of every attached front-end in shared micro-batches, in two threads of the
    process that owns the model: a receiver (all pipes, one `wait`) and a batcher (the engine). The queue
    depth is the core's: past `limits.max_queue` requests in it, a new one is answered "full" (the front-end's
    429), so the limit holds across front-ends."""

    def __init__(self, rec: Recommender, limits: ServeLimits) -> None:
        self.rec = rec
        self.limits = limits
        self._fronts: dict[int, _Frontend] = {}
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._depth = 0
        self._depth_lock = threading.Lock()
        self._gaps_ms: collections.deque[float] = collections.deque(maxlen=8)
        self._last_arrival: float | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.busy_s = 0.0
        self.batches = [0] * len(BATCH_BUCKETS)
        self.batch_count = 0
        self.batch_sum = 0
        self.restarts = 0
        self._retired_stages: dict[str, float] = {}
        self._retired_cpu = 0.0
        self._retire_lock = threading.Lock()
        """What replaced front-ends had reported: the server's CPU counters stay monotonic across restarts."""

    def attach(self, conn: Connection) -> int:
        """Serve the front-end at the other end of `conn`; its index."""
        index = len(self._fronts)
        self._fronts[index] = _Frontend(conn)
        return index

    def replace(self, index: int, conn: Connection) -> None:
        """A restarted front-end at `index`, at the other end of `conn` (the old one is gone: its queued
        requests are still ranked, their replies dropped). Its CPU and stage counters are kept in the totals."""
        old = self._fronts[index]
        with old.lock, self._retire_lock:
            old.gone = True
            for k, v in old.stages.items():
                self._retired_stages[k] = self._retired_stages.get(k, 0.0) + v
            self._retired_cpu += old.cpu
            old.stages, old.cpu = {}, 0.0
            old.conn.close()
        self._fronts[index] = _Frontend(conn)
        self.restarts += 1

    def start(self) -> None:
        self._threads = [
            threading.Thread(target=self._receive, name="engine-core-receive", daemon=True),
            threading.Thread(target=self._batch, name="engine-core-batch", daemon=True),
        ]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        """Stop after the batches already queued (the front-ends have drained by then)."""
        self._stop.set()
        self._jobs.put(None)
        for t in self._threads:
            t.join(timeout=60)
        for front in self._fronts.values():
            front.conn.close()

    @property
    def depth(self) -> int:
        return self._depth

    # -- receiving -------------------------------------------------------------------------------
    def _receive(self) -> None:
        """Every live front-end's pipe in one `wait`; the set is read again each round, so a restarted
        front-end's new pipe is picked up within 0.2 s."""
        while not self._stop.is_set():
            live = {id(f.conn): f for f in list(self._fronts.values()) if not f.gone}
            if not live:
                time.sleep(0.2)
                continue
            try:
                ready = wait([f.conn for f in live.values()], timeout=0.2)
            except OSError:  # a pipe closed by replace() between reading the set and waiting on it
                continue
            for conn in ready:
                front = live[id(conn)]
                try:
                    msg = front.conn.recv()
                except (EOFError, OSError):  # the front-end is gone; the supervisor decides what that means
                    front.gone = True
                    continue
                self._handle(front, msg)

    def _handle(self, front: _Frontend, msg: tuple[Any, ...]) -> None:
        kind, rid = msg[0], msg[1]
        if kind == "hello":
            front.pid = msg[2]
        elif kind == "stats":
            self._send(front, ("stats", rid, self.snapshot()))
        elif kind == "rank":
            _, _, jobs, stages, cpu = msg
            front.stages, front.cpu = stages, cpu
            for rid, request, prepared in jobs:
                self._admit(_Job(front, rid, request, prepared))
        else:
            raise AssertionError(f"unknown message {kind!r} from front-end {front.pid}")

    def _admit(self, job: _Job) -> None:
        with self._depth_lock:
            full = self._depth >= self.limits.max_queue
            if not full:
                self._depth += 1
        if full:
            self._send(job.frontend, ("full", job.rid, self._depth))
            return
        now = time.monotonic()
        if self._last_arrival is not None:
            self._gaps_ms.append(1000 * (now - self._last_arrival))
        self._last_arrival = now
        self._jobs.put(job)

    def _send(self, front: _Frontend, msg: tuple[Any, ...]) -> None:
        with front.lock:
            try:
                if not front.gone:
                    front.conn.send(msg)
                    return
            except (OSError, ValueError):  # it died before the supervisor noticed
                pass
        # a front-end that died cannot be answered; its requests die with it
        logger.warning("front-end pid %s is gone: dropped a reply", front.pid)

    # -- batching --------------------------------------------------------------------------------
    def _batch(self) -> None:
        """Batches one ahead, as the batch job's `rank_stream`: while batch i ranks on the device, whatever
        has queued meanwhile is packed and launched as batch i + 1 before i is read back, so the device is not
        idle while the core packs and replies. With nothing queued, batch i is read back at once (no added
        latency at low load); only the first batch after an idle spell waits out the batch window."""
        pending: tuple[list[_Job], Callable[[], list[list[Recommendation]]]] | None = None
        stop = False
        while True:
            if pending is None:
                if stop:
                    return
                first = self._jobs.get()
                if first is None:
                    return
                jobs, stop = self._fill([first])
            elif stop:  # the stop mark was read: finish what is launched, take nothing more
                jobs = []
            else:
                jobs, stop = self._fill([], wait=False)  # what queued while the last batch ranked
            launched = self._launch(jobs) if jobs else None
            if pending is not None:
                self._finish(*pending)
            pending = launched

    def _fill(self, jobs: list[_Job], *, wait: bool = True) -> tuple[list[_Job], bool]:
        """The batch `RecService._work` would make: whatever is queued now, then (`wait`) wait out the window;
        and whether the stop mark was read."""
        limits = self.limits
        deadline = time.monotonic() + (
            limits.batch_wait_ms / 1000 if wait and hold_batch_open(self._gaps_ms, limits) else 0
        )
        while len(jobs) < limits.max_batch:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    job = self._jobs.get(timeout=remaining)
                except queue.Empty:
                    break
            if job is None:
                return jobs, True
            jobs.append(job)
        return jobs, False

    def _launch(self, jobs: list[_Job]) -> tuple[list[_Job], Callable[[], list[list[Recommendation]]]]:
        """Start ranking `jobs` (Recommender.launch_prepared). A batch that fails to launch fails when it is
        finished, so that its requests are answered in order with the error."""
        busy = time.perf_counter()
        try:
            finish = self.rec.launch_prepared(
                [j.request for j in jobs], merge_prepared([j.prepared for j in jobs])
            )
        except Exception as e:
            finish = functools.partial(_reraise, e)
        self.busy_s += time.perf_counter() - busy
        return jobs, finish

    def _finish(self, jobs: list[_Job], finish: Callable[[], list[list[Recommendation]]]) -> None:
        """Read a launched batch back and answer each of its requests."""
        busy = time.perf_counter()
        try:
            results = finish()
        except Exception as e:  # one bad batch must not kill the core; each waiter gets the error
            logger.exception("engine batch failed")
            replies: list[tuple[Any, ...]] = [("failed", j.rid, f"{type(e).__name__}: {e}") for j in jobs]
        else:
            replies = [("done", j.rid, r) for j, r in zip(jobs, results, strict=True)]
        finally:
            self.busy_s += time.perf_counter() - busy
            self.batch_count += 1
            self.batch_sum += len(jobs)
            for k, b in enumerate(BATCH_BUCKETS):
                if len(jobs) <= b:
                    self.batches[k] += 1
                    break
            with self._depth_lock:
                self._depth -= len(jobs)
        for j, reply in zip(jobs, replies, strict=True):
            self._send(j.frontend, reply)

    # -- counters --------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """The core's counters, and the server's CPU (this process's and each front-end's last report)."""
        stages = dict(self.rec.clock.seconds())
        with self._retire_lock:
            fronts = list(self._fronts.items())
            retired_cpu = self._retired_cpu
            for k, v in self._retired_stages.items():
                stages[k] = stages.get(k, 0.0) + v
        for _, fe in fronts:
            for k, v in fe.stages.items():
                stages[k] = stages.get(k, 0.0) + v
        return {
            "busy_s": self.busy_s,
            "queue_depth": self._depth,
            "batches": list(self.batches),
            "batch_count": self.batch_count,
            "batch_sum": self.batch_sum,
            "ranked_by": dict(getattr(self.rec.engine, "ranked_by", {})),
            "stages": stages,
            "cpu_s": time.process_time() + retired_cpu + sum(fe.cpu for _, fe in fronts),
            "frontends": {i: fe.pid for i, fe in fronts},
            "restarts": self.restarts,
        }


def _reraise(error: BaseException) -> Any:
    raise error


class CoreGone(RuntimeError):
    """The engine core closed its end of the pipe (the server is stopping, or it died)."""


class CoreClient:
    """A front-end's end of the pipe: sends prepared requests and reads replies in one thread, which resolves
    each request's asyncio future on its event loop."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._send_lock = threading.Lock()
        self._ids = itertools.count()
        self._waiting: dict[int, Any] = {}
        self._reader: threading.Thread | None = None
        self.gone = False
        self.last_stats: dict[str, Any] = {}

    def start(self) -> None:
        if self._reader is None:
            self._send(("hello", next(self._ids), os.getpid()))
            self._reader = threading.Thread(target=self._read, name="core-client", daemon=True)
            self._reader.start()

    def _send(self, msg: tuple[Any, ...]) -> None:
        with self._send_lock:
            self._conn.send(msg)

    def expect(self) -> tuple[int, asyncio.Future[list[Recommendation]]]:
        """A request id and the future its reply resolves (call on the event loop)."""
        rid = next(self._ids)
        fut: asyncio.Future[list[Recommendation]] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        return rid, fut

    def send_rank(self, jobs: list[tuple[int, RankRequest, PreparedBatch]], stages: dict[str, float]) -> None:
        """Prepared requests (id, request, its PreparedBatch of one) in one message, with this process's stage
        seconds and CPU so far (the core sums every process's on /metrics)."""
        if self.gone:
            raise CoreGone("the engine core is gone")
        self._send(("rank", 0, jobs, stages, time.process_time()))

    def forget(self, rid: int) -> None:
        self._waiting.pop(rid, None)

    def stats(self, timeout: float = 2.0) -> dict[str, Any]:
        """The core's counters now (its last ones if it does not answer within `timeout`)."""
        if self.gone:
            return self.last_stats
        rid = next(self._ids)
        fut: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()
        self._waiting[rid] = fut
        try:
            self._send(("stats", rid))
            self.last_stats = fut.result(timeout)
        except (concurrent.futures.TimeoutError, OSError):
            logger.warning("the engine core did not send its counters within %.1f s", timeout)
        finally:
            self._waiting.pop(rid, None)
        return self.last_stats

    def _read(self) -> None:
        while True:
            try:
                kind, rid, value = self._conn.recv()
            except (EOFError, OSError):
                break
            fut = self._waiting.pop(rid, None)
            if fut is None:  # its request timed out here meanwhile
                continue
            if isinstance(fut, concurrent.futures.Future):
                fut.set_result(value)
                continue
            if kind == "done":
                outcome: Any = value
            elif kind == "full":
                outcome = APIError(
                    429,
                    f"server busy: {value} requests queued",
                    type="rate_limit_error",
                    code="queue_full",
                    headers={"Retry-After": "1"},
                )
            else:
                outcome = RuntimeError(f"engine batch failed: {value}")
            fut.get_loop().call_soon_threadsafe(_settle, fut, outcome)
        self.gone = True
        for fut in list(self._waiting.values()):
            if isinstance(fut, asyncio.Future):
                fut.get_loop().call_soon_threadsafe(_settle, fut, CoreGone("the engine core is gone"))
        self._waiting.clear()


def _settle(fut: asyncio.Future[Any], outcome: Any) -> None:
    if fut.done():
        return
    if isinstance(outcome, BaseException):
        fut.set_exception(outcome)
    else:
        fut.set_result(outcome)


class _CoreCounters:
    """The engine core's counters on a front-end's /metrics, under the names the single-process server uses
    (genrec_engine_busy_seconds, genrec_queue_depth, genrec_batch_size, genrec_ranked_requests,
    genrec_stage_cpu_seconds: every process's), plus genrec_server_cpu_seconds (every process's CPU) and
    genrec_frontend_info (which front-end answered: its index and pid). A scrape asks the core for its counters
    (one pipe round trip, in a worker thread, not on the event loop; its last ones if it does not answer within 2 s)."""

    def __init__(self, client: CoreClient, index: int) -> None:
        self.client = client
        self.index = index

    def collect(self) -> Any:
        s = self.client.stats()
        info = GaugeMetricFamily(
            "genrec_frontend_info",
            "The front-end process that answered (index, pid)",
            labels=["frontend", "pid"],
        )
        info.add_metric([str(self.index), str(os.getpid())], 1)
        yield info
        if not s:
            return
        yield GaugeMetricFamily(
            "genrec_frontends", "Front-end processes attached to the engine core", value=len(s["frontends"])
        )
        yield CounterMetricFamily(
            "genrec_frontend_restarts",
            "Front-end processes that died and were started again",
            value=s.get("restarts", 0),
        )
        yield CounterMetricFamily(
            "genrec_engine_busy_seconds",
            "Wall seconds the engine worker spent ranking batches",
            value=s["busy_s"],
        )
        yield GaugeMetricFamily(
            "genrec_queue_depth", "Requests waiting for the engine", value=s["queue_depth"]
        )
        cumulative = list(itertools.accumulate(s["batches"]))
        yield HistogramMetricFamily(
            "genrec_batch_size",
            "Requests per engine batch",
            buckets=[
                *((str(float(b)), c) for b, c in zip(BATCH_BUCKETS, cumulative, strict=True)),
                ("+Inf", s["batch_count"]),
            ],
            sum_value=s["batch_sum"],
        )
        ranked = CounterMetricFamily(
            "genrec_ranked_requests",
            "Requests ranked, by search: exact (tree scoring) or beam",
            labels=["search"],
        )
        for search, n in sorted(s["ranked_by"].items()):
            ranked.add_metric([search], n)
        yield ranked
        stages = CounterMetricFamily(
            "genrec_stage_cpu_seconds",
            "Server CPU seconds by stage of the requests' work (every process: engine core and front-ends)",
            labels=["stage"],
        )
        for stage in STAGES:
            stages.add_metric([stage], s["stages"].get(stage, 0.0))
        yield stages
        yield CounterMetricFamily(
            "genrec_server_cpu_seconds",
            "CPU seconds of every server process (engine core and front-ends; each front-end as of its last request)",
            value=s["cpu_s"],
        )


class RemoteService(RecService):
    """A front-end's RecService: `rec` has no model (genrec.prep.prompt_recommender); a request is prepared
    here, off the event loop, and ranked by the engine core at the other end of `client`.

    Everything before the engine (parsing, history resolution, rendering at admission, the template API) is
    RecService's own; only `_submit` and the lifecycle differ. /metrics: request counts, latencies, tokens
    and process_cpu_seconds_total are this process's; the engine's counters and the stage CPU are the core's
    (_CoreCounters)."""

    def __init__(
        self,
        rec: Recommender,
        client: CoreClient,
        *,
        model_name: str,
        limits: ServeLimits | None = None,
        index: int = 0,
        layout_policy: tuple[str, int] | None = None,
    ) -> None:
        super().__init__(rec, model_name=model_name, limits=limits)
        self.client = client
        self.layout_policy = layout_policy
        """The ranking engine's layout_policy: tries are laid out here, as genrec.prep's workers do."""
        self.metrics = Metrics()
        for local in (self.metrics.engine_busy, self.metrics.queue_depth, self.metrics.batch_size):
            self.metrics.registry.unregister(local)  # the core's, below
        self.metrics.registry.register(_CoreCounters(client, index))
        self._outbox: list[tuple[int, RankRequest, asyncio.Future[Any]]] = []
        """Admitted requests not yet prepared (RemoteService._flush)."""
        self._flushing = False
        self._flusher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.client.start()

    async def stop(self, *, drain_s: float = 30.0) -> None:
        deadline = time.monotonic() + drain_s
        while self._pending and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def _submit(self, req: RankRequest) -> list[Recommendation]:
        rid, fut = self.client.expect()
        self._pending += 1
        self._outbox.append((rid, req, fut))
        if not self._flushing:  # else the running flush takes it with the next group
            self._flushing = True
            self._flusher = asyncio.create_task(self._flush())
        try:
            return await asyncio.wait_for(fut, self.limits.request_timeout_s)
        except asyncio.TimeoutError:
            raise timed_out(self.limits) from None
        except CoreGone:
            raise APIError(503, "the engine is stopping", type="server_error", code="engine_gone") from None
        finally:
            self._pending -= 1
            self.client.forget(rid)

    async def _flush(self) -> None:
        """Prepare and send the requests admitted so far, as one group (one tokenizer call, one index search),
        in a thread; the requests admitted meanwhile make the next group. Nothing waits to fill a group: a
        lone request goes at once."""
        try:
            while self._outbox:
                group = self._outbox[: self.limits.max_batch]
                del self._outbox[: len(group)]
                await asyncio.to_thread(self._prepare_and_send, group)
        finally:
            self._flushing = False

    def _prepare_and_send(self, group: list[tuple[int, RankRequest, asyncio.Future[Any]]]) -> None:
        """Tokenise, retrieve and lay out (genrec.prep.prepare_with_layouts), then send: the prompt's messages
        stay here, the core needs only ids. A group that fails is prepared again request by request, so that
        only the request at fault gets its error (a 400, as in one process)."""
        requests = [req for _, req, _ in group]
        try:
            parts = split_prepared(prepare_with_layouts(self.rec, requests, self.layout_policy))
        except Exception as e:  # handed to the request, whose handler maps it to a status (as in one process)
            if len(group) == 1:
                fut = group[0][2]
                fut.get_loop().call_soon_threadsafe(_settle, fut, e)
                return
            for one in group:
                self._prepare_and_send([one])
            return
        for req, part in zip(requests, parts, strict=True):
            req.prompt_tokens = len(part.prompts[0])
        jobs = [
            (rid, dataclasses.replace(req, messages=None), part)
            for (rid, req, _), part in zip(group, parts, strict=True)
        ]
        try:
            self.client.send_rank(jobs, self.rec.clock.seconds())
        except (CoreGone, OSError):
            for _, _, fut in group:
                fut.get_loop().call_soon_threadsafe(_settle, fut, CoreGone("the engine core is gone"))
