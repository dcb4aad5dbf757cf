"""Worker processes that prepare ranking batches for a batch job while the model ranks.

Ranking a batch has a CPU side (render each prompt in the template sandbox, tokenize it, search the
retriever's index) and a model side (tries, then the engine). On a GPU host the CPU side is most of
the time: on an H100, one process ranked 474-531 users/s and the same job with 8 workers 1,020
(BENCHMARKS.md, "Offline batch throughput"). `PrepPool` runs `Recommender.prepare` in `workers` processes, each holding the run's
data, IDs, templates, retriever and tokenizer but no model, a few batches ahead of the process that
owns the model; results come back in submission order (`Future.result()`). A worker's own CPU work per user is
timed by bench.prep_worker.

Workers are spawned, not forked: the parent may hold a CUDA context and torch's thread pools, which
a forked child must not inherit. Each worker loads the run once (a few seconds) and uses one
torch, faiss and tokenizer thread, so N workers use about N cores.

`model_lists` / `ranked_batches` rank a list of held-out examples this way (evaluation and training's validation).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

from tqdm.auto import tqdm

from genrec.config import RunConfig
from genrec.data import Example
from genrec.engines.base import ChatPrompts
from genrec.recommender import (
    PreparedBatch,
    RankRequest,
    Recommender,
    history_requests,
    load_retrieval,
)
from genrec.run import with_chosen_candidates

_REC: Recommender | None = None
_POLICY: tuple[str, int] | None = None
T = TypeVar("T")


class PromptEngine(ChatPrompts):
    """An engine that only encodes prompts (a worker's): the run's tokenizer and chat template, no model."""

    name = "prompts"
    concurrent = False

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ranked_by: Counter[str] = Counter()

    def rank(self, *_: Any, **__: Any) -> Any:
        raise RuntimeError("a preparation worker has no model: rank in the process that owns the engine")

    launch = rank


def prompt_recommender(run_path: str) -> Recommender:
    """The run's Recommender with a PromptEngine: everything `prepare` needs, no model."""
    from transformers import AutoTokenizer

    from genrec.retrieval import Retriever
    from genrec.run import RunDir

    run = RunDir(run_path)
    tokenizer = AutoTokenizer.from_pretrained(run.model_dir())
    cfg = with_chosen_candidates(run, run.load_config())
    retriever = Retriever(run.load_embeddings())
    collab, weight = load_retrieval(run, cfg, text=retriever)
    return Recommender(
        run,
        cfg,
        run.load_data(),
        run.load_ids(),
        PromptEngine(tokenizer),
        retriever,
        collab=collab,
        fusion_weight=weight,
    )


def _init(run_path: str, parent: int, policy: tuple[str, int] | None) -> None:
    global _REC, _POLICY
    _POLICY = policy
    # Ctrl-C in a terminal reaches the whole process group: the job stops the pool (and says how to resume);
    # a worker interrupted on its queue would only print a traceback each
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=exit_with, args=(parent,), daemon=True).start()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the workers are the parallelism
    import torch

    torch.set_num_threads(1)
    try:  # one faiss (OpenMP) thread too, whatever imported faiss first: else N workers start N x cores threads
        import faiss

        faiss.omp_set_num_threads(1)
    except ImportError:
        pass
    _REC = prompt_recommender(run_path)


def exit_with(parent: int, code: int = 0) -> None:
    """Leave with `code` when the parent process is gone, however it went (run in a daemon thread): a worker
    blocks on its task queue forever if the job is killed (`kill -9` leaves the queue's pipe open in the other
    workers), and the server's front-ends (genrec.serve.frontends) must not outlive their engine core."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(code)


def _prepare(requests: list[RankRequest]) -> PreparedBatch:
    assert _REC is not None, "worker not initialised"
    return prepare_with_layouts(_REC, requests, _POLICY)


def prepare_with_layouts(
    rec: Recommender, requests: Sequence[RankRequest], policy: tuple[str, int] | None
) -> PreparedBatch:
    """`rec.prepare(requests)` and, under the ranking engine's `layout_policy` (None: none), the tree layouts it
    will score exactly (numpy arrays, cheap to send): the work a process without the model does for one that
    has it (these workers; the server's front-ends, genrec.serve.engine_core)."""
    prepared = rec.prepare(requests)
    if policy is not None:
        from genrec.engines.hf import tree_layouts

        with rec.clock.stage("layout"):
            found = tree_layouts(rec.prepared_tries(requests, prepared), *policy)
        prepared.layouts = [found.get(i) for i in range(len(requests))]
    return prepared


class PrepPool:
    """`workers` processes running `Recommender.prepare` on the run at `run_path` (and, with `layouts`,
    laying out the tries the transformers engine will score exactly).

    Use as a context manager; `submit(requests)` returns a Future of the PreparedBatch. A worker's
    error (a bad template, say) comes back as that future's exception.
    """

    def __init__(self, run_path: str, workers: int, *, layouts: tuple[str, int] | None = None) -> None:
        """`layouts`: the ranking engine's `layout_policy` (transformers engine): workers also lay out
        the tries it will score exactly."""
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self._pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init,
            initargs=(str(run_path), os.getpid(), layouts),
        )

    def submit(self, requests: Sequence[RankRequest]) -> Future[PreparedBatch]:
        return self._pool.submit(_prepare, list(requests))

    def prepared(
        self, batches: Iterable[tuple[T, list[RankRequest]]]
    ) -> Iterator[tuple[T, list[RankRequest], PreparedBatch]]:
        """Each (tag, batch) with its PreparedBatch, in input order, keeping two batches per worker in
        preparation while the caller ranks (input is read only as far ahead as that)."""
        ahead: deque[tuple[T, list[RankRequest], Future[PreparedBatch]]] = deque()
        for tag, reqs in batches:
            ahead.append((tag, reqs, self.submit(reqs)))
            if len(ahead) > 2 * self.workers:
                tag0, reqs0, f = ahead.popleft()
                yield tag0, reqs0, f.result()
        while ahead:
            tag0, reqs0, f = ahead.popleft()
            yield tag0, reqs0, f.result()

    def warm(self) -> None:
        """Wait until every worker has loaded the run (so a benchmark does not time start-up)."""
        futures = [self._pool.submit(_ready) for _ in range(self.workers * 2)]
        for f in futures:
            f.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> PrepPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ready() -> bool:
    return _REC is not None


@contextmanager
def prepared_batches(
    rec: Recommender, batches: Iterable[tuple[T, list[RankRequest]]], workers: int
) -> Iterator[Iterator[tuple[T, list[RankRequest], PreparedBatch]]]:
    """Each (tag, batch) with its PreparedBatch, in order: made by `workers` PrepPool processes (with the
    tree layouts `rec`'s engine wants) or, with 0, here as it is consumed. The batch job and `evaluate`
    rank from this."""
    if not workers:
        yield ((tag, reqs, rec.prepare(reqs)) for tag, reqs in batches)
        return
    with PrepPool(str(rec.run.path), workers, layouts=getattr(rec.engine, "layout_policy", None)) as pool:
        yield pool.prepared(batches)


def model_lists(
    rec: Any, examples: Sequence[Example], cfg: RunConfig, *, progress: bool = True, workers: int = 0
) -> list[list[int]]:
    """genrec's ranked items per example, in batches of eval.batch_size; `workers` > 0 prepares the
    batches (prompts, retrieval, tree layouts) in that many processes while this one ranks (genrec.prep)."""
    with tqdm(total=len(examples), desc="genrec ranking", unit="user", disable=not progress) as bar:
        return [lst for batch in ranked_batches(rec, examples, cfg, bar, workers=workers) for lst in batch]


def ranked_batches(
    rec: Any,
    examples: Sequence[Example],
    cfg: RunConfig,
    bar: Any,
    *,
    workers: int = 0,
    queries: Sequence[str] | None = None,
) -> Iterator[list[list[int]]]:
    """`model_lists` batch by batch, in order, each counted on `bar` (a tqdm); `queries`: each example's free
    text, ranked with its history (the need protocol)."""
    e = cfg.eval
    starts = range(0, len(examples), e.batch_size)
    batches = (
        (
            None,
            history_requests(
                [ex.history for ex in examples[s : s + e.batch_size]],
                cfg.eval_ranking,
                users=[ex.user for ex in examples[s : s + e.batch_size]],
                queries=None if queries is None else queries[s : s + e.batch_size],
            ),
        )
        for s in starts
    )
    with prepared_batches(rec, batches, workers) as prepared:
        for _, reqs, ranked in rec.rank_stream(prepared):
            bar.update(len(reqs))
            yield [[r.item for r in lst] for lst in ranked]
