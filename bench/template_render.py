"""Cost of building prompts: render the run's template for one user three ways, side by side (alternated, median
of five rounds): in Jinja's plain sandbox (no limits), in genrec's bounded sandbox under its line trace (what
every render paid before issue 26, and unchecked templates still pay) and on its hot path (a checked version:
the same size limits, timed by ticks alone); then turn rendered conversations into token ids, one tokenizer
call each vs one call per batch (what `Recommender.rank_requests` does), checking that both give the same ids.

python -m bench.template_render --run runs/demo
"""

from __future__ import annotations

import argparse
import statistics
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
    p.add_argument("--users", type=int, default=1024, help="conversations to encode")
    p.add_argument("--batch", type=int, default=256, help="conversations per batched tokenizer call")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    from transformers import AutoTokenizer

    from bench.common import save
    from genrec.data import leave_one_out
    from genrec.engines import encode_chat, encode_chats
    from genrec.run import RunDir
    from genrec.templates.prompt_store import TemplateChecker, TemplateStore
    from genrec.templates.prompts import parse_template

    run = RunDir(args.run)
    checker = TemplateChecker.for_run(run, n=1)
    _, t = TemplateStore.for_run(run.path).template(run.load_config().prompt.template)
    v = checker.builder(t).variables(checker.data.sequences[checker.samples[0]][:-1])
    env = SandboxedEnvironment(undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["words"] = lambda text, k: " ".join(str(text).split()[:k])
    body, system = env.from_string(t.body), env.from_string(t.system or "")
    traced_t = parse_template(t.text, source=t.source)  # checked=False: renders under the line trace
    if t.checked is not True or traced_t.render(v) != t.render(v):
        raise SystemExit("the hot path and the traced render disagree (or the template is not checked)")
    rounds: dict[str, list[float]] = {"plain": [], "traced": [], "hot": []}
    for _ in range(5):  # alternated, median of five: these two cores are noisy
        rounds["plain"].append(per_call(lambda: (system.render(**v), body.render(**v)), args.n // 5))
        rounds["traced"].append(per_call(lambda: traced_t.render(v), args.n // 5))
        rounds["hot"].append(per_call(lambda: t.render(v), args.n // 5))
    plain, traced, hot = (statistics.median(rounds[k]) for k in ("plain", "traced", "hot"))

    tok = AutoTokenizer.from_pretrained(run.model_dir())
    builder = checker.builder(t)
    examples = leave_one_out(checker.data, "test")
    convs = [builder.messages(list(e.history), e.user) for e in examples[: args.users]]
    one = [encode_chat(tok, c) for c in convs]
    many = [x for s in range(0, len(convs), args.batch) for x in encode_chats(tok, convs[s : s + args.batch])]
    if many != one:
        raise SystemExit("batched encoding gave other ids than one call per conversation")
    singles, batches = [], []
    for _ in range(5):  # alternated, median of five: these two cores are noisy
        singles.append(per_call(lambda: [encode_chat(tok, c) for c in convs], 1) / len(convs))
        batches.append(
            per_call(
                lambda: [
                    encode_chats(tok, convs[s : s + args.batch]) for s in range(0, len(convs), args.batch)
                ],
                1,
            )
            / len(convs)
        )
    single, batched = statistics.median(singles), statistics.median(batches)
    save(
        args.out,
        {
            "template": t.name,
            "history_items": len(v["history"]),
            "plain_sandbox_us": round(plain, 1),
            "bounded_traced_us": round(traced, 1),
            "bounded_hot_path_us": round(hot, 1),
            "traced_over_hot": round(traced / hot, 2),
            "hot_over_plain": round(hot / plain, 2),
            "conversations": len(convs),
            "encode_one_call_each_us": round(single, 1),
            f"encode_batched_{args.batch}_us": round(batched, 1),
        },
    )


if __name__ == "__main__":
    main()
