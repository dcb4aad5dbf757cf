"""Renders untrusted templates in a process of their own that is stopped when it overruns.

The sandbox (genrec.templates.sandbox) bounds what a template may build and how much CPU it may spend, and that is
what keeps the hot path (chat requests on saved, already-checked versions) cheap. Templates nobody has
checked yet (editor previews of drafts, the renders a save runs against sample users, `genrec prompts
validate`) run here instead, where two limits hold whatever the sandbox missed:

- memory: the worker's address space may grow by `memory_mb` over what it holds at start (RLIMIT_AS), so
  an allocation past it fails in the worker (MemoryError), never in the server;
- time: the parent waits `seconds_per_render` per render, then kills the worker (SIGKILL) and starts a new
  one for the next call; a C-level operation that ignores the sandbox's CPU budget still ends.

The worker is `python -m genrec.templates.prompt_worker`, started on first use and reused, with a spare started
beside it that takes over at once when it is killed. Tasks go to it pickled
(the parent trusts itself); answers come back as JSON (the parent does not trust what a template made).
Knows templates (genrec.templates.prompts), not runs or servers.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import struct
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import IO, Any

from genrec.templates.prompts import PromptTemplate, TemplateProblem

logger = logging.getLogger(__name__)

_HEADER = struct.Struct("!I")


@dataclass(frozen=True)
class IsolationLimits:
    seconds_per_render: float = 1.0
    """Wall-clock seconds the worker may take per render before it is killed."""
    memory_mb: int = 64
    """Memory (MiB of address space) the worker may add to what it holds after start-up."""
    start_timeout_s: float = 120.0
    """How long a new worker may take to import and say it is ready (not counted against renders)."""


class RenderWorker:
    """One worker process, used by one call at a time (callers queue on a lock)."""

    def __init__(self, limits: IsolationLimits | None = None) -> None:
        self.limits = limits or IsolationLimits()
        self._proc: subprocess.Popen[bytes] | None = None
        self._spare: subprocess.Popen[bytes] | None = None
        """A worker started ahead, to replace one that is killed."""
        self._handshaken = False
        self._lock = threading.Lock()
        self.kills = 0
        """Workers stopped for overrunning their time (for tests and logs)."""
        self.started_rss_kib = 0
        """The current worker's resident memory once it was ready (KiB)."""

    def render(
        self, template: PromptTemplate, variable_sets: list[dict[str, Any]]
    ) -> list[list[dict[str, str]]]:
        """`template.render(v)` for each of `variable_sets`, in the worker. A failure is a TemplateProblem
        (as the in-process render raises it) with `index` set to the variable set that failed."""
        task = {f.name: getattr(template, f.name) for f in fields(template)}
        task["limits"] = asdict(template.limits)
        with self._lock:
            proc = self._ready()
            assert proc.stdin is not None and proc.stdout is not None
            _send(proc.stdin, pickle.dumps((task, variable_sets)))
            budget = self.limits.seconds_per_render * max(len(variable_sets), 1)
            answer = self._receive(proc, budget)
        if answer is None:
            raise TemplateProblem(
                f"{template.source}: rendering took longer than {budget:g} s and was stopped", line=None
            )
        if answer.get("ok"):
            return answer["messages"]  # type: ignore[no-any-return]
        problem = TemplateProblem(answer["message"], line=answer.get("line"), column=answer.get("column"))
        problem.index = answer.get("index")  # type: ignore[attr-defined]
        raise problem

    def _ready(self) -> subprocess.Popen[bytes]:
        """The worker, started if there is none, once it has said it is ready."""
        if self._proc is None or self._proc.poll() is not None:
            self._spawn()
        proc = self._proc
        assert proc is not None
        if not self._handshaken:
            if self._receive(proc, self.limits.start_timeout_s) != {"ready": True}:
                self._stop()
                raise TemplateProblem("the template render worker did not start")
            self._handshaken = True
            with open(f"/proc/{proc.pid}/status") as f:
                self.started_rss_kib = int(next(x for x in f if x.startswith("VmRSS:")).split()[1])
        return proc

    def _spawn(self) -> None:
        """Make the spare the worker (it started earlier, so it is ready or nearly) and start a new spare:
        after a worker is killed, the next render does not wait for a process to start and import."""
        spare = self._spare if self._spare is not None and self._spare.poll() is None else None
        self._proc = spare or self._launch()
        self._spare = self._launch()
        self._handshaken = False

    def _launch(self) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        here = str(Path(__file__).resolve().parent.parent)  # the same genrec as this process
        env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return subprocess.Popen(
            [sys.executable, "-m", "genrec.templates.prompt_worker", str(self.limits.memory_mb)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )

    def _receive(self, proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any] | None:
        """The worker's next answer, or None when it overran `timeout` (it is then killed)."""
        assert proc.stdout is not None
        box: list[bytes | None] = []
        reader = threading.Thread(target=lambda: box.append(_recv(proc.stdout)), daemon=True)  # type: ignore[arg-type]
        reader.start()
        reader.join(timeout)
        if reader.is_alive():
            self.kills += 1
            logger.warning("template render worker overran %.1f s: stopped", timeout)
            self._stop()
            reader.join(5)
            if self._handshaken:  # a render overran: its replacement starts now, not on the next call
                self._spawn()
            return None
        data = box[0] if box else None
        if data is None:  # it died: the memory limit hit where Python could not raise MemoryError
            self._stop()
            return {"ok": False, "message": "the template needed more memory than its limit allows"}
        answer: dict[str, Any] = json.loads(data)
        return answer

    def _stop(self) -> None:
        _kill(self._proc)
        self._proc = None

    def close(self) -> None:
        with self._lock:
            self._stop()
            _kill(self._spare)
            self._spare = None


def _kill(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None:
        proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


_shared: RenderWorker | None = None
_shared_lock = threading.Lock()


def shared_worker() -> RenderWorker:
    """The process's render worker (started on first use)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = RenderWorker()
        return _shared


def _send(stream: IO[bytes], payload: bytes) -> None:
    stream.write(_HEADER.pack(len(payload)) + payload)
    stream.flush()


def _recv(stream: IO[bytes]) -> bytes | None:
    head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size:
        return None
    (n,) = _HEADER.unpack(head)
    body = stream.read(n)
    return body if len(body) == n else None


# -- the worker side ------------------------------------------------------------------------------
def _address_space() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _render_all(task: dict[str, Any], variable_sets: list[dict[str, Any]], memory_mb: int) -> dict[str, Any]:
    from genrec.templates.sandbox import RenderLimits

    out: list[list[dict[str, str]]] = []
    index = None  # the variable set being rendered when it failed (None: the template did not compile)
    try:
        # traced whatever the parent thought of it: the worker is for templates not to be trusted yet
        template = PromptTemplate(**{**task, "limits": RenderLimits(**task["limits"]), "checked": False})
        for variables in variable_sets:
            index = len(out)
            out.append(template.render(variables))
        return {"ok": True, "messages": out}
    except TemplateProblem as e:
        return {"ok": False, "message": str(e), "line": e.line, "column": e.column, "index": index}
    except MemoryError:
        source = task.get("source", "<template>")
        message = f"{source}: rendering needs more than {memory_mb} MiB"
        return {"ok": False, "message": message, "index": index}


def main() -> None:
    import resource

    memory_mb = int(sys.argv[1])
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but answers on the pipe
    import genrec.templates.sandbox  # noqa: F401  (imported before the limit is set)

    limit = _address_space() + memory_mb * 2**20
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    resource.setrlimit(
        resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard)
    )
    _send(stdout, json.dumps({"ready": True}).encode())
    while (data := _recv(stdin)) is not None:
        task, variable_sets = pickle.loads(data)
        _send(stdout, json.dumps(_render_all(task, variable_sets, memory_mb)).encode())


if __name__ == "__main__":
    main()
