"""Cost of the bounded sandbox: render the run's template for one user, bounded vs plain Jinja sandbox.

python -m bench.template_render --run runs/demo
"""

from __future__ import annotations

import argparse
import time

import jinja2
from jinja2.sandbox import SandboxedEnvironment


def per_call(fn, n: int) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    from bench.common import save
    from genrec.prompt_store import TemplateChecker, TemplateStore
    from genrec.run import RunDir

    run = RunDir(args.run)
    checker = TemplateChecker.for_run(run, n=1)
    _, t = TemplateStore.for_run(run.path).template(run.load_config().prompt.template)
    v = checker.builder(t).variables(checker.data.sequences[checker.samples[0]][:-1])
    env = SandboxedEnvironment(undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["words"] = lambda text, k: " ".join(str(text).split()[:k])
    body, system = env.from_string(t.body), env.from_string(t.system or "")
    bounded = per_call(lambda: t.render(v), args.n)
    plain = per_call(lambda: (system.render(**v), body.render(**v)), args.n)
    save(
        args.out,
        {
            "template": t.name,
            "history_items": len(v["history"]),
            "bounded_us": round(bounded, 1),
            "plain_sandbox_us": round(plain, 1),
        },
    )


if __name__ == "__main__":
    main()
