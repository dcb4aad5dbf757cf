"""Cost of building prompts: render the run's template for one user, bounded vs plain Jinja sandbox; then
turn rendered conversations into token ids, one tokenizer call each vs one call per batch (what
`Recommender.rank_requests` does), checking that both give the same ids.

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

    run = RunDir(args.run)
    checker = TemplateChecker.for_run(run, n=1)
    _, t = TemplateStore.for_run(run.path).template(run.load_config().prompt.template)
    v = checker.builder(t).variables(checker.data.sequences[checker.samples[0]][:-1])
    env = SandboxedEnvironment(undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["words"] = lambda text, k: " ".join(str(text).split()[:k])
    body, system = env.from_string(t.body), env.from_string(t.system or "")
    bounded = per_call(lambda: t.render(v), args.n)
    plain = per_call(lambda: (system.render(**v), body.render(**v)), args.n)

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
            "bounded_us": round(bounded, 1),
            "plain_sandbox_us": round(plain, 1),
            "conversations": len(convs),
            "encode_one_call_each_us": round(single, 1),
            f"encode_batched_{args.batch}_us": round(batched, 1),
        },
    )


if __name__ == "__main__":
    main()
