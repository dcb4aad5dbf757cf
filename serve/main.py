"""Server entry point: load a run, build the app, run uvicorn (graceful shutdown drains requests)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from genrec.run import RunDir

logger = logging.getLogger(__name__)


@dataclass
class ServeArgs:
    run: Path
    backend: str = "hf"
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: list[str] = field(default_factory=list)
    admin_keys: list[str] = field(default_factory=list)
    """`LABEL=KEY` (or a bare KEY, labelled `admin`): may edit templates; the label is the author."""
    model_name: str | None = None
    device: str | None = None
    search: str | None = None
    """auto | beam | exact (transformers engine); None: the run's eval.search."""
    max_queue: int = 256
    max_batch: int = 32
    max_history: int = 512
    timeout_s: float = 60.0
    batch_wait_ms: float = 5.0
    adaptive_wait: bool = True


def build_app(args: ServeArgs):  # type: ignore[no-untyped-def]
    from genrec.recommender import Recommender
    from serve.app import create_app
    from serve.service import RecService, ServeLimits

    run = RunDir(args.run)
    # the server drives vLLM through AsyncLLM, so concurrent batches share the engine
    backend = "vllm-async" if args.backend == "vllm" else args.backend
    rec = Recommender.load(run, backend=backend, device=args.device, search=args.search)
    limits = ServeLimits(
        max_history=args.max_history,
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        request_timeout_s=args.timeout_s,
        batch_wait_ms=args.batch_wait_ms,
        adaptive_wait=args.adaptive_wait,
    )
    service = RecService(rec, model_name=args.model_name or run.path.name, limits=limits)
    return create_app(
        service,
        api_keys=args.api_keys,
        admin_keys=parse_admin_keys(args.admin_keys),
        # AsyncLLM's engine core is a child process: it stops with the app (uvicorn re-raises SIGTERM
        # after the lifespan ends, so code after uvicorn.run() would never run)
        on_shutdown=getattr(rec.engine, "shutdown", None),
    )


def parse_admin_keys(specs: list[str]) -> dict[str, str]:
    """`alice=KEY` -> {KEY: 'alice'}; a bare key is labelled 'admin'."""
    out = {}
    for spec in specs:
        label, sep, key = spec.partition("=")
        label, key = (label.strip(), key.strip()) if sep else ("admin", spec.strip())
        if not key or not label:
            raise ValueError(f"--admin-key {spec!r}: expected LABEL=KEY")
        out[key] = label
    return out


def serve(args: ServeArgs) -> None:
    import uvicorn

    app = build_app(args)
    logger.info("serving %s on http://%s:%d/v1 (backend %s)", args.run, args.host, args.port, args.backend)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=30)
