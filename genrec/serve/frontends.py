"""`genrec serve --frontends N`: N front-end processes on one listening socket, feeding one engine core.

The parent process loads the model, binds the socket once (the kernel hands each new connection to whichever
front-end accepts it first) and runs the EngineCore (genrec.serve.engine_core). Each front-end is a spawned
process (the parent may hold a CUDA context, which a forked child must not inherit) running uvicorn with the
whole app (auth, the template API, errors, body limits) over a RemoteService whose Recommender has no model
(genrec.prep.prompt_recommender). Every front-end sees template activations made through any other: the
template store is on disk and each process rechecks it every ServeLimits.template_recheck_s.

Stopping: SIGTERM or SIGINT to the parent is forwarded to every front-end; each stops accepting, finishes
the requests it holds (the core keeps ranking meanwhile) and exits; then the core stops. A front-end that
exits on its own (a crash, the OOM killer) is started again at the same index on a new pipe, as gunicorn
restarts a worker: the requests it held are lost with their connections, the others never notice. More than
`max_restarts` deaths within `restart_window_s` is a crash loop, not bad luck: the whole server stops loudly
(exit status 1), since a port that half works is worse than none.
Each response carries `x-genrec-frontend: <index>/<pid>`, so a client can see which process answered.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from genrec.recommender import Recommender
from genrec.serve.engine_core import EngineCore
from genrec.serve.http import HTTPLimits
from genrec.serve.service import ServeLimits

logger = logging.getLogger(__name__)


@dataclass
class FrontendSpec:
    """What a front-end process needs to build its app (picklable: it is sent to a spawned process)."""

    run: str
    model_name: str
    limits: ServeLimits = field(default_factory=ServeLimits)
    api_keys: list[str] = field(default_factory=list)
    admin_keys: dict[str, str] = field(default_factory=dict)
    http: HTTPLimits = field(default_factory=HTTPLimits)
    public: list[str] = field(default_factory=list)
    layout_policy: tuple[str, int] | None = None
    """The engine's layout_policy: front-ends lay out the tries it will score exactly."""
    log_level: str = "info"


class FrontendHeader:
    """Pure ASGI wrapper adding `x-genrec-frontend: <index>/<pid>` to every HTTP response."""

    def __init__(self, app: Any, value: str) -> None:
        self.app = app
        self.header = (b"x-genrec-frontend", value.encode())

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_with)


def frontend_main(index: int, sock: socket.socket, conn: Connection, spec: FrontendSpec, parent: int) -> None:
    """A front-end process: the app over a RemoteService, served by uvicorn on the parent's socket."""
    import uvicorn

    from genrec.prep import exit_with, prompt_recommender
    from genrec.serve.app import create_app
    from genrec.serve.engine_core import CoreClient, RemoteService
    from genrec.serve.http import uvicorn_options

    logging.basicConfig(
        level=spec.log_level.upper(), format=f"%(asctime)s frontend {index} %(name)s: %(message)s"
    )
    threading.Thread(target=exit_with, args=(parent, 1), daemon=True).start()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the front-ends are the parallelism
    import torch

    torch.set_num_threads(1)
    try:
        import faiss

        faiss.omp_set_num_threads(1)
    except ImportError:
        pass
    rec = prompt_recommender(spec.run)
    service = RemoteService(
        rec,
        CoreClient(conn),
        model_name=spec.model_name,
        limits=spec.limits,
        index=index,
        layout_policy=spec.layout_policy,
    )
    app = create_app(
        service, api_keys=spec.api_keys, admin_keys=spec.admin_keys, http=spec.http, public=spec.public
    )
    config = uvicorn.Config(
        FrontendHeader(app, f"{index}/{os.getpid()}"), log_level=spec.log_level, **uvicorn_options(spec.http)
    )
    uvicorn.Server(config).run(sockets=[sock])


def bind(host: str, port: int, *, backlog: int = 2048) -> socket.socket:
    """The listening socket every front-end accepts on (port 0: a free one). Connections made before a
    front-end is up wait in the backlog."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


class FrontendServer:
    """The engine core over `rec` in this process and `frontends` front-end processes on `host:port`.

    start(), then wait() (returns when every front-end has exited: 0 after shutdown(), 1 when one exited on
    its own), then close(). shutdown() is what SIGTERM does: it may be called from a signal handler."""

    def __init__(
        self,
        rec: Recommender,
        spec: FrontendSpec,
        *,
        frontends: int,
        host: str,
        port: int,
        max_restarts: int = 5,
        restart_window_s: float = 60.0,
    ) -> None:
        if frontends < 1:
            raise ValueError(f"--frontends must be >= 1, got {frontends}")
        if max_restarts < 0:
            raise ValueError(f"--frontend-restarts must be >= 0, got {max_restarts}")
        self.rec, self.spec, self.frontends = rec, spec, frontends
        self.host, self.requested_port = host, port
        self.max_restarts, self.restart_window_s = max_restarts, restart_window_s
        self.core = EngineCore(rec, spec.limits)
        self.procs: list[Any] = []
        self.sock: socket.socket | None = None
        self.stopping = False
        self.failed = False
        """Front-ends crash-looped: the server stopped itself (exit status 1)."""
        self._deaths: list[float] = []
        """When front-ends died on their own (monotonic), for the crash-loop rule."""

    @property
    def port(self) -> int:
        assert self.sock is not None, "start() first"
        return int(self.sock.getsockname()[1])

    def start(self) -> None:
        self.sock = bind(self.host, self.requested_port)
        for index in range(self.frontends):
            self.procs.append(self._spawn(index))
        self.core.start()
        logger.info(
            "engine core pid %d; front-ends %s on %s:%d",
            os.getpid(),
            [p.pid for p in self.procs],
            self.host,
            self.port,
        )

    def _spawn(self, index: int) -> Any:
        """Front-end `index` in a new process on a new pipe (attached, or replacing the dead one's)."""
        ctx = multiprocessing.get_context("spawn")
        ours, theirs = ctx.Pipe()
        if index < len(self.procs):
            self.core.replace(index, ours)
        else:
            self.core.attach(ours)
        proc = ctx.Process(
            target=frontend_main,
            args=(index, self.sock, theirs, self.spec, os.getpid()),
            name=f"genrec-frontend-{index}",
        )
        proc.start()
        theirs.close()
        return proc

    def _restart_allowed(self, now: float) -> bool:
        self._deaths = [t for t in self._deaths if now - t < self.restart_window_s]
        self._deaths.append(now)
        return len(self._deaths) <= self.max_restarts

    def shutdown(self) -> None:
        """Forward SIGTERM to every front-end: each drains its requests and exits."""
        self.stopping = True
        for p in self.procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)

    def wait(self, timeout: float | None = None) -> int | None:
        """Until every front-end has exited (None: `timeout` passed first). A front-end that exits while the
        server is not stopping is started again; past the crash-loop limit it stops the others instead and
        makes this 1."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            for index, p in enumerate(self.procs):
                if p.is_alive() or self.stopping:
                    continue
                if self._restart_allowed(time.monotonic()):
                    logger.error(
                        "front-end %s (pid %d) exited with status %s: starting it again",
                        p.name,
                        p.pid,
                        p.exitcode,
                    )
                    self.procs[index] = self._spawn(index)
                else:
                    logger.error(
                        "front-end %s (pid %d) exited with status %s: %d deaths within %g s, more than "
                        "--frontend-restarts %d: stopping the server",
                        p.name,
                        p.pid,
                        p.exitcode,
                        len(self._deaths),
                        self.restart_window_s,
                        self.max_restarts,
                    )
                    self.failed = True
                    self.shutdown()
            alive = [p.sentinel for p in self.procs if p.is_alive()]
            if not alive:
                if self.stopping or self.failed:
                    return 1 if self.failed else 0
                continue  # one died after the loop above looked at it: restart it, or stop, on the next pass
            if deadline is not None and time.monotonic() >= deadline:
                return None
            wait(alive, timeout=0.5)

    def close(self) -> None:
        """Stop everything still running (front-ends first, then the core) and release the socket."""
        if any(p.is_alive() for p in self.procs):
            self.shutdown()
            if self.wait(timeout=float(self.spec.limits.request_timeout_s) + 35) is None:
                for p in self.procs:
                    if p.is_alive():
                        logger.error("front-end %s did not stop: killing it", p.name)
                        p.kill()
        self.core.stop()
        if self.sock is not None:
            self.sock.close()


def serve_frontends(
    rec: Recommender, spec: FrontendSpec, *, frontends: int, host: str, port: int, max_restarts: int = 5
) -> None:
    """Run the server until SIGTERM / SIGINT (drained, then return) or front-ends crash-loop (SystemExit(1))."""
    server = FrontendServer(rec, spec, frontends=frontends, host=host, port=port, max_restarts=max_restarts)

    def on_signal(signum: int, frame: Any) -> None:
        logger.info("signal %d: draining %d front-ends", signum, frontends)
        server.shutdown()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    server.start()
    try:
        status = server.wait()
    finally:
        server.close()
    if status:
        raise SystemExit(status)
