"""Property-based probe of the HTTP API (Schemathesis over the app's own OpenAPI schema): every route, with
no key, a reader's key and an admin's key, positive and negative (schema-violating) inputs; counts the
statuses and lists every 5xx (there should be none: every client input is a 4xx).

    python -m bench.api_probe --run runs/demo --examples 200 --out bench/results/api_probe.json

The default test suite runs the same probe with a few examples per route (tests/test_server.py); this
script runs as many as asked. It starts the server itself (loopback, random port) on the run's directory
with a copy of nothing: template writes the probe makes land in the run's template store, so point it at
a scratch copy of a run.
"""

from __future__ import annotations

import argparse
import collections
import logging
import socket
import time
from pathlib import Path
from typing import Any

READER, ADMIN = "probe-reader-key", "probe-admin-key"


def probe(
    base_url: str, schema: dict[str, Any], *, auths: dict[str, str | None], examples: int
) -> dict[str, Any]:
    """Run `examples` generated cases per route, per auth, per generation mode; the statuses seen."""
    import requests
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.core.result import Err

    loaded = schemathesis.openapi.from_dict(schema)
    statuses: collections.Counter[str] = collections.Counter()
    failures: list[dict[str, Any]] = []
    session = requests.Session()
    for result in loaded.get_all_operations():
        if isinstance(result, Err):
            raise ValueError(f"the app's OpenAPI schema has an invalid operation: {result.err()}")
        op = result.ok()
        for auth_name, key in auths.items():
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                route = f"{op.method.upper()} {op.path} ({auth_name}, {mode.value})"

                def call(case: Any, route: str = route, headers: dict[str, str] = headers) -> None:
                    response = case.call(base_url=base_url, session=session, headers=headers, timeout=60)
                    statuses[str(response.status_code)] += 1
                    if response.status_code >= 500:
                        failures.append(
                            {
                                "route": route,
                                "status": response.status_code,
                                "request": case.as_curl_command(),
                                "response": response.text[:500],
                            }
                        )

                _cases(op.as_strategy(generation_mode=mode), call, examples)
    return {
        "cases": sum(statuses.values()),
        "statuses": dict(sorted(statuses.items())),
        "5xx": len(failures),
        "failures": failures[:50],
    }


def _cases(strategy: Any, call: Any, examples: int) -> None:
    """`call` on `examples` cases drawn from `strategy` (deterministic: the same cases every run)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case: Any) -> None:
        call(case)

    try:
        run()
    except Unsatisfiable:  # no input can violate the schema of a route without parameters (GET /health)
        return


def main() -> None:
    import threading

    import uvicorn

    from bench.common import save
    from genrec.serve.main import ServeArgs, build_app, uvicorn_options

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--run", type=Path, required=True, help="A trained run (a scratch copy: the probe saves templates)."
    )
    ap.add_argument(
        "--examples", type=int, default=100, help="Cases per route, per key, per generation mode."
    )
    ap.add_argument("--out", default=None, help="Write the results as JSON here.")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    app = build_app(ServeArgs(run=args.run, api_keys=[READER], admin_keys=[f"probe={ADMIN}"]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **uvicorn_options())
    )
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    started = time.perf_counter()
    try:
        out = probe(
            f"http://127.0.0.1:{port}",
            app.openapi(),
            auths={"none": None, "reader": READER, "admin": ADMIN},
            examples=args.examples,
        )
    finally:
        server.should_exit = True
    out.update({"seconds": round(time.perf_counter() - started, 1), "examples": args.examples})
    for f in out["failures"]:
        print(f"5xx: {f['route']}: {f['status']} {f['response'][:200]}\n  {f['request'][:300]}")
    save(args.out, out)


if __name__ == "__main__":
    main()
