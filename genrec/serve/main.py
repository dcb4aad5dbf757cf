"""Server entry point: load a run, build the app, run uvicorn (graceful shutdown drains requests)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from genrec.run import RunDir
from genrec.serve.http import KEEP_ALIVE_S, HTTPLimits, uvicorn_options
from genrec.serve.service import ServeLimits

logger = logging.getLogger(__name__)
__all__ = ["KEEP_ALIVE_S", "ServeArgs", "build_app", "serve", "uvicorn_options"]


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
    limits: ServeLimits = field(default_factory=ServeLimits)
    """Queue, batch, history and timeout limits (genrec.serve.service.ServeLimits)."""
    http: HTTPLimits = field(default_factory=HTTPLimits)
    """Request body size and header/body read deadlines (genrec.serve.http.HTTPLimits)."""
    public: list[str] = field(default_factory=list)
    """`metrics` and/or `docs`: served without an API key when keys are configured (genrec.serve.app.PUBLIC_CHOICES)."""
    frontends: int = 1
    """Processes serving HTTP (parsing, rendering, tokenising, retrieval, tree layouts, encoding) beside the one
    that ranks (genrec.serve.frontends); 1: one process does everything. More than 1 needs the hf backend."""
    frontend_restarts: int = 5
    """Front-ends that die are started again; more deaths than this within a minute stop the server."""


def build_app(args: ServeArgs):  # type: ignore[no-untyped-def]
    from genrec.recommender import Recommender
    from genrec.serve.app import create_app
    from genrec.serve.service import RecService

    run = RunDir(args.run)
    # the server drives vLLM through AsyncLLM, so concurrent batches share the engine
    backend = "vllm-async" if args.backend == "vllm" else args.backend
    rec = Recommender.load(run, backend=backend, device=args.device, search=args.search)
    service = RecService(rec, model_name=args.model_name or run.path.name, limits=args.limits)
    return create_app(
        service,
        api_keys=args.api_keys,
        admin_keys=parse_admin_keys(args.admin_keys),
        # AsyncLLM's engine core is a child process: it stops with the app (uvicorn re-raises SIGTERM
        # after the lifespan ends, so code after uvicorn.run() would never run)
        on_shutdown=getattr(rec.engine, "shutdown", None),
        http=args.http,
        public=args.public,
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

    if args.frontends > 1:
        serve_with_frontends(args)
        return
    app = build_app(args)
    logger.info("serving %s on http://%s:%d/v1 (backend %s)", args.run, args.host, args.port, args.backend)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", **uvicorn_options(args.http))


def serve_with_frontends(args: ServeArgs) -> None:
    """`genrec serve --frontends N`: this process loads the model, warms it up and runs the engine core; N
    front-end processes serve HTTP (genrec.serve.frontends)."""
    import dataclasses

    from genrec.errors import GenrecError
    from genrec.recommender import Recommender
    from genrec.serve.frontends import FrontendSpec, serve_frontends
    from genrec.serve.service import RecService

    if args.backend != "hf":
        raise GenrecError(
            f"--frontends {args.frontends} needs --backend hf: the engine core ranks prepared requests "
            "(prompt ids, tree layouts) with the transformers engine; the vLLM backend serves from one process "
            "(--frontends 1), where AsyncLLM runs its own engine core"
        )
    run = RunDir(args.run)
    rec = Recommender.load(run, backend="hf", device=args.device, search=args.search)
    model_name = args.model_name or run.path.name
    if str(getattr(rec.engine, "device", "cpu")).startswith("cpu"):
        # leave the front-ends their cores: torch's threads spin while they wait for each other
        import os

        import torch

        torch.set_num_threads(max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - args.frontends)))
    if args.limits.warmup_requests > 0:  # the core warms the engine before any front-end accepts
        RecService(rec, model_name=model_name, limits=args.limits).warm_up(args.limits.warmup_requests)
    spec = FrontendSpec(
        run=str(run.path),
        model_name=model_name,
        limits=dataclasses.replace(args.limits, warmup_requests=0),
        api_keys=list(args.api_keys),
        admin_keys=parse_admin_keys(args.admin_keys),
        http=args.http,
        public=list(args.public),
        layout_policy=getattr(rec.engine, "layout_policy", None),
    )
    logger.info(
        "serving %s on http://%s:%d/v1 (backend hf, %d front-end processes)",
        args.run,
        args.host,
        args.port,
        args.frontends,
    )
    serve_frontends(
        rec,
        spec,
        frontends=args.frontends,
        host=args.host,
        port=args.port,
        max_restarts=args.frontend_restarts,
    )
