"""End to end on tiny sizes: prepare -> build-ids -> train (TRL) -> evaluate -> recommend, and LoRA merge."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from genrec.config import RankingOptions, apply_overrides
from genrec.evaluation import evaluate
from genrec.recommender import RankRequest, Recommender, UnknownItems
from genrec.training import train
from tests.conftest import make_run


@pytest.fixture(scope="module")
def trained(trained_run):
    return trained_run


@pytest.mark.slow
def test_training_writes_a_servable_model_and_learns(trained):
    run, _, summary = trained
    assert (run.merged_dir / "config.json").is_file() and (run.merged_dir / "tokenizer.json").is_file()
    assert summary["method"] == "full" and summary["steps"] == 40
    losses = [json.loads(x)["loss"] for x in run.train_log_file.read_text().splitlines() if '"loss"' in x]
    assert len(losses) >= 4 and losses[-1] < 0.7 * losses[0]
    meta = run.meta()
    assert meta["template"]["name"] == "default" and len(meta["template"]["hash"]) == 16
    assert any(run.checkpoints_dir.glob("checkpoint-*"))


@pytest.mark.slow
def test_evaluation_report_and_validity(trained):
    run, cfg, _ = trained
    report = evaluate(run, cfg, progress=False)
    res = report["results"]
    assert set(res) == {"genrec", "popularity", "itemknn", "markov", "retriever", "sasrec"}
    assert res["genrec"]["validity"] == 1.0 and res["genrec"]["full_lists"] == 1.0
    for r in res.values():
        assert 0.0 <= r["ndcg@10"] <= r["recall@10"] <= 1.0
    for f in (
        "eval_test.json",
        "report_test.md",
        "eval_test_metrics.png",
        "train_loss.png",
        "eval_test_users.parquet",
    ):
        assert (run / f).is_file(), f
    assert "| genrec |" in (run / "report_test.md").read_text()
    # the tiny catalogue's trie is under eval.max_tree_tokens: every user was ranked exactly, and it says so
    assert report["ranked_by"] == {"exact": report["users"]}
    assert "ranked exactly (tree scoring; top 10)" in (run / "report_test.md").read_text()
    # genrec minus each baseline, user by user: the means are the per-user file's, and the report shows them
    import pandas as pd

    users = pd.read_parquet(run / "eval_test_users.parquet")
    by = users.groupby("method")["ndcg@10"].apply(list)
    for name, d in report["genrec_vs"].items():
        diff = np.mean(np.array(by["genrec"]) - np.array(by[name]))
        assert (
            d["ndcg@10"]["diff"] == pytest.approx(diff)
            and d["ndcg@10"]["low"] <= diff <= d["ndcg@10"]["high"]
        )
    text = (run / "report_test.md").read_text()
    assert (
        "## genrec against each baseline, user by user" in text
        and "| sasrec | " in text.split("user by user")[1]
    )


@pytest.mark.slow
def test_recommendations_are_valid_catalogue_items(trained):
    run, _, _ = trained
    rec = Recommender.load(run, device="cpu")
    user = rec.data.users[3]
    hist = rec.user_history(user)
    for mode in ("retriever", "all"):
        out = rec.rank_histories(
            [hist, hist[:2]], options=RankingOptions(n_items=7, candidates=mode, n_candidates=30)
        )
        for recs, h in zip(out, [hist, hist[:2]], strict=True):
            items = [r.item for r in recs]
            assert len(items) == 7 and len(set(items)) == 7 and not set(items) & set(h)
            assert all(rec.catalog.item_ids[r.item] == r.item_id for r in recs)
            assert [r.score for r in recs] == sorted((r.score for r in recs), reverse=True)
    # retriever mode: results are inside the retriever's candidate set
    cands = set(rec.retrieved(hist, n=30))
    assert {
        r.item for r in rec.rank_histories([hist], options=RankingOptions(n_items=10, n_candidates=30))[0]
    } <= cands
    # a batch's retriever-mode requests share one index search; each keeps its own n and exclusions
    reqs = [
        RankRequest(hist, options=RankingOptions(candidates="retriever", n_candidates=30)),
        RankRequest(
            hist[:2], options=RankingOptions(candidates="retriever", n_candidates=12), exclude=[hist[5]]
        ),
        RankRequest(hist, options=RankingOptions(candidates="all")),
        RankRequest(hist[1:], options=RankingOptions(candidates="retriever", n_candidates=40)),
    ]
    tries = rec.candidate_tries(reqs)
    for r, trie in zip(reqs, tries, strict=True):
        items = {item for _, item in trie}
        if r.candidates == "all":
            assert items == set(range(len(rec.catalog))) - set(r.history)
            continue
        q = rec.retriever.history_query(r.history)[None]
        expected, _ = rec.retriever.search(q, r.n_candidates, exclude=[sorted({*r.history, *r.exclude})])
        assert items == {int(i) for i in expected[0] if i >= 0} and len(items) == r.n_candidates
    # histories given as ids, ID strings or titles resolve to the same rows
    refs = [rec.catalog.item_ids[hist[0]], rec.ids.item_string(hist[1]), rec.catalog.titles[hist[2]]]
    assert rec.resolve_items(refs) == hist[:3]
    with pytest.raises(UnknownItems, match="'nope'"):
        rec.resolve_items(["nope", refs[0]])


@pytest.mark.slow
def test_resume_continues_from_checkpoint(trained, tmp_path):
    run, cfg, _ = trained
    cfg2 = apply_overrides(cfg, ["train.max_steps=45"])
    summary = train(run, cfg2, resume=True)
    assert summary["steps"] == 45
    steps = [json.loads(x).get("step") for x in run.train_log_file.read_text().splitlines()]
    assert max(s for s in steps if s) == 45 and min(s for s in steps if s) <= 5  # log kept across the resume


@pytest.mark.slow
def test_time_budget_stops_training_and_still_saves_the_model(tmp_path):
    run, cfg = make_run(tmp_path, "budget", ["train.max_steps=500", "train.max_minutes=0.0001"])
    summary = train(run, cfg)
    assert summary["stopped_by_time_budget"] is True and 1 <= summary["steps"] < 500
    assert (run.merged_dir / "config.json").is_file()
    assert run.meta()["train"]["stopped_by_time_budget"] is True
    assert (run.checkpoints_dir / f"checkpoint-{summary['steps']}").is_dir()  # `--resume` goes on from there


@pytest.mark.slow
def test_interrupted_training_names_its_last_checkpoint_and_resumes_from_it(tmp_path, monkeypatch, caplog):
    """Ctrl-C mid-training (the CLI exits quietly on it): the log names the checkpoint `--resume` goes on from."""
    import logging

    from transformers import TrainerCallback

    from genrec import training

    run, cfg = make_run(tmp_path, "stopped", ["train.max_steps=12", "train.save_steps=5"])
    real = training.loss_log_callback

    class CtrlC(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 7:
                raise KeyboardInterrupt

    monkeypatch.setattr(training, "loss_log_callback", lambda path: CtrlC())  # in place of the loss log
    with pytest.raises(KeyboardInterrupt), caplog.at_level(logging.WARNING, logger="genrec.training"):
        train(run, cfg)
    assert (
        f"training interrupted at step 7; the last checkpoint is {run.checkpoints_dir / 'checkpoint-5'}: "
        f"`genrec train --run {run.path} --resume` goes on from it" in caplog.messages
    )
    monkeypatch.setattr(training, "loss_log_callback", real)
    assert train(run, cfg, resume=True)["steps"] == 12


@pytest.mark.slow
def test_early_stopping_keeps_the_best_checkpoint(tmp_path):
    """A learning rate far too high makes the validation loss worsen: training stops after `patience`
    evaluations without a new best, and the saved model is the best checkpoint's, not the last step's."""
    run, cfg = make_run(
        tmp_path,
        "early",
        [
            "train.max_steps=200",
            "train.save_steps=5",
            "train.early_stopping_patience=2",
            "train.learning_rate=0.3",
        ],
    )
    summary = train(run, cfg)
    assert summary["stopped_early"] is True and summary["steps"] < 200
    assert summary["best_step"] is not None and summary["best_step"] <= summary["steps"] - 10
    assert summary["eval_loss"] == pytest.approx(
        summary["best_eval_loss"], rel=1e-4
    )  # the best weights were kept
    assert run.meta()["train"]["best_step"] == summary["best_step"]
    # training that runs to its end while still improving is not reported as stopped early
    run2, cfg2 = make_run(
        tmp_path, "patient", ["train.max_steps=10", "train.save_steps=5", "train.early_stopping_patience=1"]
    )
    summary2 = train(run2, cfg2)
    assert summary2["steps"] == 10 and summary2["stopped_early"] is False and summary2["best_step"] == 10


def test_history_loss_rows_label_the_answer_and_every_shown_history_id_after_the_first(tmp_path):
    from genrec.data import history_windows
    from genrec.errors import GenrecError
    from genrec.templates.prompts import PromptBuilder, parse_template
    from genrec.training import history_loss_rows, prepare_model, prompt_builder

    run, cfg = make_run(tmp_path, "hist")
    data, ids = run.load_data(), run.load_ids()
    builder = prompt_builder(run, cfg, data, ids)  # the default template: titles and IDs
    _, tok = prepare_model(run, cfg, builder, data)
    windows = history_windows(data, window=cfg.prompt.max_history)
    rows, too_long = history_loss_rows(builder, tok, windows)
    assert too_long == 0 and len(rows) == len(windows)
    for w, row in zip(windows[:30], rows[:30], strict=True):
        ids_, labels = row["input_ids"], row["labels"]
        first_label = next(i for i, x in enumerate(labels) if x != -100)
        answer_at = len(ids_) - len(
            tok.encode(ids.item_string(w.target) + "<|im_end|>\n", add_special_tokens=False)
        )
        # labelled prompt tokens: the IDs of history items 2.. in order; then the answer's ID, not the
        # end-of-turn tokens after it
        labelled = tok.convert_ids_to_tokens([x for x in labels[:answer_at] if x != -100])
        assert labelled == [t for item in w.history[1:] for t in ids.item_tokens(item)]
        answer = tok.convert_tokens_to_ids(ids.item_tokens(w.target))
        assert labels[answer_at:] == answer + [-100] * (len(ids_) - answer_at - len(answer))
        assert ids_[answer_at : answer_at + len(answer)] == answer
        assert all(x in (-100, y) for x, y in zip(labels, ids_, strict=True))
        # the first history item is shown but not labelled: nothing before it to predict it from
        assert first_label > ids_.index(tok.convert_tokens_to_ids(ids.item_tokens(w.history[0])[0]))
    # validation rows: the answer's ID only
    answer_only, _ = history_loss_rows(builder, tok, windows[:5], history=False)
    for w, row in zip(windows[:5], answer_only, strict=True):
        labelled = [x for x in row["labels"] if x != -100]
        assert labelled == tok.convert_tokens_to_ids(ids.item_tokens(w.target))
    # too long rows are left out and counted
    longest = max(len(r["input_ids"]) for r in rows)
    kept, dropped = history_loss_rows(builder, tok, windows, max_length=longest - 1)
    assert dropped >= 1 and len(kept) + dropped == len(windows)
    # a template that does not show the history's IDs is refused, naming it
    titles_only = parse_template(
        "---\nname: titles\n---\n{% for item in history %}{{ item.title }}; {% endfor %}",
        source="titles.jinja",
    )
    bad = PromptBuilder.for_config(titles_only, data.catalog, ids, cfg.prompt)
    with pytest.raises(
        GenrecError, match="template 'titles' does not show the history's item IDs oldest first"
    ):
        history_loss_rows(bad, tok, windows[:3])
    # answer-only rows (a restricted model.id_softmax without the history loss) need no IDs in the prompt
    titles_rows, _ = history_loss_rows(bad, tok, windows[:3], history=False)
    assert [[x for x in r["labels"] if x != -100] for r in titles_rows] == [
        tok.convert_tokens_to_ids(ids.item_tokens(w.target)) for w in windows[:3]
    ]


@pytest.mark.slow
def test_history_loss_training_keeps_the_checkpoint_with_the_best_validation_ranking(tmp_path, monkeypatch):
    """train.select_metric=ndcg@10: every evaluation ranks the validation users; the kept weights are the
    best-ranking checkpoint's, and `genrec evaluate` on those users gives the same figure. The ranking
    Recommender (catalogue trie, user index) is built once, not at each of the six evaluations."""
    from genrec import recommender

    built = []
    init = recommender.Recommender.__init__
    monkeypatch.setattr(
        recommender.Recommender, "__init__", lambda self, *a, **kw: built.append(1) or init(self, *a, **kw)
    )
    run, cfg = make_run(
        tmp_path,
        "select",
        [
            "train.history_loss=true",
            "train.max_steps=40",
            "train.save_steps=8",
            "train.early_stopping_patience=5",
            "train.select_metric=ndcg@10",
            "train.valid_users=40",
        ],
    )
    summary = train(run, cfg)
    assert summary["history_loss"] is True and summary["examples"] > 0
    assert len(built) == 1
    logged = [json.loads(x) for x in run.train_log_file.read_text().splitlines()]
    figures = [(x["step"], x["eval_ndcg@10"]) for x in logged if "eval_ndcg@10" in x]
    # one per checkpoint, then the final evaluation of the kept weights
    assert [step for step, _ in figures] == [8, 16, 24, 32, 40, 40]
    ranked = dict(figures[:-1])
    best = max(ranked, key=lambda s: (ranked[s], -s))  # the first of equals wins
    assert summary["best_step"] == best and summary["best_eval_ndcg@10"] == pytest.approx(ranked[best])
    assert summary["eval_ndcg@10"] == pytest.approx(ranked[best]) == figures[-1][1]
    cfg_valid = apply_overrides(cfg, ["eval.split=valid", "eval.baselines=[]"])
    report = evaluate(run, cfg_valid, progress=False)
    assert report["users"] == 40
    assert report["results"]["genrec"]["ndcg@10"] == pytest.approx(ranked[best], abs=1e-6)


def test_patience_running_out_on_the_last_step_is_not_stopping_early():
    from types import SimpleNamespace

    from genrec.training import early_stopping_summary

    stopper = SimpleNamespace(early_stopping_patience=2, early_stopping_patience_counter=2)

    def state(step):
        return SimpleNamespace(
            best_model_checkpoint="ckpt/checkpoint-510", best_metric=2.2, global_step=step, max_steps=680
        )

    assert early_stopping_summary(stopper, state(680))["stopped_early"] is False
    assert early_stopping_summary(stopper, state(595)) == {
        "best_step": 510,
        "best_eval_loss": 2.2,
        "stopped_early": True,
    }


@pytest.mark.parametrize(
    ("base", "setting", "expected"),
    [
        ("tiny", None, False),
        ("Qwen/Qwen2.5-0.5B", None, True),
        ("tiny", True, True),
        ("Qwen/x", False, False),
    ],
)
def test_gradient_checkpointing_is_off_for_tiny_bases_unless_set(tmp_path, base, setting, expected):
    """TRL recomputes activations by default; a from-scratch tiny model does not need the memory, and on the
    CPU recomputing cost a quarter of each step (with the same weights after training, BENCHMARKS.md)."""
    from genrec.config import RunConfig
    from genrec.run import RunDir
    from genrec.training import sft_config

    cfg = RunConfig()
    cfg.model.base, cfg.train.gradient_checkpointing = base, setting
    assert sft_config(RunDir(tmp_path / "run"), cfg).gradient_checkpointing is expected


@pytest.mark.slow
@pytest.mark.parametrize(
    "rows",
    [[], ["model.id_softmax=full", "train.history_loss=false"]],
    ids=["defaults", "vocabulary-softmax-answer-rows"],
)
def test_lora_merge_reproduces_adapter_logits(tmp_path, rows):
    """LoRA with the defaults (history-loss rows, the softmax over the ID tokens through genrec's head on the
    adapter's trainable LM head) and with TRL's own prompt-completion rows and fused head."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    run, cfg = make_run(
        tmp_path,
        "lora",
        [
            "train.method=lora",
            "train.max_steps=6",
            "train.lora_r=4",
            "train.lora_alpha=8",
            "train.learning_rate=0.01",
            *rows,
        ],
    )
    summary = train(run, cfg)
    assert summary["method"] == "lora" and (run.adapter_dir / "adapter_config.json").is_file()
    assert summary["id_softmax"] == cfg.model.id_softmax and summary["history_loss"] == cfg.train.history_loss
    adapter = AutoPeftModelForCausalLM.from_pretrained(run.adapter_dir).eval()
    merged = AutoModelForCausalLM.from_pretrained(run.merged_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(run.base_dir).eval()
    ids = torch.tensor([[5, 17, 33, 2, 400, 401]]) % merged.config.vocab_size
    with torch.no_grad():
        a, m, b = adapter(input_ids=ids).logits, merged(input_ids=ids).logits, base(input_ids=ids).logits
    assert torch.allclose(a, m, atol=1e-4)
    assert not torch.allclose(a, b, atol=1e-3)  # training changed something: the test can fail


def test_text_embeddings_with_installed_minilm(tmp_path):
    run, _ = make_run(tmp_path, "text", ["ids.embedding=text"])
    emb = np.load(run.embeddings_file)
    assert emb.shape[1] == 384 and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)
    assert run.meta()["ids"]["embedding"] == "text:minilm"


@pytest.mark.slow
def test_recommend_cli_answers_for_a_history(trained):
    from typer.testing import CliRunner

    from genrec.cli import app

    run, _, _ = trained
    data = Recommender.load(run, device="cpu").data
    hist = ",".join(data.catalog.item_ids[i] for i in data.sequences[0][:3])
    result = CliRunner().invoke(app, ["recommend", "--run", str(run), "--history", hist, "-n", "4"])
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()[:2] in ("1.", "2.", "3.", "4.")]
    assert len(lines) == 4
    result = CliRunner().invoke(app, ["recommend", "--run", str(run), "--history", "nope"])
    assert "unknown item(s): 'nope'" in str(result.exception)


def test_evaluate_cli_split_comes_from_the_command_not_a_saved_config(trained, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from genrec.cli import app

    run = tmp_path / "copy"
    shutil.copytree(trained[0].path, run)
    base = ["evaluate", "--run", str(run), "-s", "eval.baselines=[]", "-s", "eval.max_users=10"]
    result = CliRunner().invoke(app, [*base, "-s", "eval.split=valid"])
    assert result.exit_code == 0, result.output
    assert "valid split" in result.output and (run / "eval_valid.json").is_file()
    result = CliRunner().invoke(app, base)  # the saved config now says valid; the default is still test
    assert result.exit_code == 0, result.output
    assert (
        "test split" in result.output and json.loads((run / "eval_test.json").read_text())["split"] == "test"
    )
    assert "strongest baseline" not in result.output  # no baseline to compare with
    result = CliRunner().invoke(app, [*base, "-s", "eval.baselines=[popularity,markov]"])
    assert result.exit_code == 0, result.output
    report = json.loads((run / "eval_test.json").read_text())
    best = max(["popularity", "markov"], key=lambda n: report["results"][n]["ndcg@10"])
    assert f"genrec - {best} (strongest baseline) on ndcg@10: " in result.output


@pytest.mark.parametrize("search", ["beam", "exact"])
def test_run_config_chooses_how_the_transformers_engine_ranks(trained, monkeypatch, search):
    """eval.search reaches the engine every command loads; both ways return valid, distinct candidates."""
    from genrec.run import RunDir

    run, cfg, _ = trained
    override = apply_overrides(cfg, [f"eval.search={search}", "eval.max_tree_tokens=64"])
    monkeypatch.setattr(RunDir, "load_config", lambda self: override)
    rec = Recommender.load(run, device="cpu")
    assert rec.engine.search == search and rec.engine.max_tree_tokens == 64
    history = [int(i) for i in rec.data.sequences[0][:3]]
    (recs,) = rec.rank_histories(
        [history], options=RankingOptions(n_items=5, candidates="retriever", n_candidates=30)
    )
    assert len({r.item for r in recs}) == 5 and not {r.item for r in recs} & set(history)


def _tiny_qwen_pair():
    """Two identical tiny tied-embedding Qwen2 models (vocabulary 300), one to patch and one to compare with."""
    import copy

    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    model = Qwen2ForCausalLM(cfg)
    return model, copy.deepcopy(model)


def test_the_labelled_positions_head_matches_trls_fused_head():
    """On the CPU genrec scores only the labelled positions (TRL's fused head projects every position
    there): the same loss, per-token fields and gradients."""
    from trl.trainer.utils import add_fused_lm_head

    from genrec.training import labelled_positions_head

    trl_model, ours = _tiny_qwen_pair()
    for m in (trl_model, ours):
        add_fused_lm_head(m, outputs=("log_probs", "entropy", "is_top1"))
    labelled_positions_head(ours)
    ids = torch.randint(0, 300, (3, 12))
    labels = ids.clone()
    labels[:, :6] = -100
    labels[1] = -100  # a row without labels
    mask = torch.ones_like(ids)
    mask[2, :3] = 0
    for count in (None, torch.tensor(9)):
        a, b = (
            m(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, num_items_in_batch=count)
            for m in (trl_model, ours)
        )
        for field in ("loss", "log_probs", "entropy", "is_top1", "label_mask"):
            torch.testing.assert_close(
                getattr(b, field).float(), getattr(a, field).float(), atol=1e-5, rtol=1e-5
            )
        a.loss.backward()
        b.loss.backward()
        for p, q in zip(trl_model.parameters(), ours.parameters(), strict=True):
            torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-4)
            p.grad = q.grad = None
    # other calls are the model's own forward
    torch.testing.assert_close(ours(input_ids=ids).logits, trl_model(input_ids=ids).logits)


LEVELS_300 = [list(range(250, 260)), list(range(260, 270)), list(range(270, 290))]


GPU = pytest.param(
    "cuda",
    marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
)


@pytest.mark.parametrize("device", ["cpu", GPU])
@pytest.mark.parametrize("groups", [LEVELS_300, [list(range(250, 290))]], ids=["level", "ids"])
def test_the_restricted_softmax_head_matches_brute_force(groups, device):
    """model.id_softmax level / ids: every labelled position is scored against its group's rows, on any device
    (the GPU case is skipped in CI): the loss, per-token fields and gradients equal a log-softmax over the
    group's columns of the full logits."""
    from trl.trainer.utils import add_fused_lm_head

    from genrec.id_softmax import IdSoftmax
    from genrec.training import labelled_positions_head

    ref, ours = (m.to(device) for m in _tiny_qwen_pair())
    tol = {"atol": 1e-5, "rtol": 1e-5} if device == "cpu" else {"atol": 1e-4, "rtol": 1e-4}
    add_fused_lm_head(ours, outputs=("log_probs", "entropy", "is_top1"))
    labelled_positions_head(ours, IdSoftmax(groups, vocab_size=300))
    ids = torch.randint(0, 300, (3, 12))
    labels = torch.full_like(ids, -100)
    labels[0, 6:9] = torch.tensor([251, 265, 289])
    labels[2, 9:12] = torch.tensor([259, 260, 270])  # row 1: no labels
    mask = torch.ones_like(ids)
    mask[2, :3] = 0
    ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
    for count in (None, torch.tensor(9, device=device)):
        out = ours(
            input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, num_items_in_batch=count
        )
        logits = ref(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = labels[:, 1:]
        want = torch.zeros(target.shape, device=device)
        entropy = torch.zeros(target.shape, device=device)
        for b, t in (target != -100).nonzero().tolist():
            group = next(g for g in groups if int(target[b, t]) in g)
            logp = logits[b, t, group].log_softmax(-1)
            at = (torch.tensor(b, device=device), torch.tensor(t, device=device))
            want = want.index_put(at, logp[group.index(int(target[b, t]))])
            entropy[b, t] = float(-(logp.exp() * logp).sum().detach())
        loss = -want.sum() / (6 if count is None else 9)
        torch.testing.assert_close(out.loss, loss, **tol)
        torch.testing.assert_close(out.log_probs, want, **tol)
        torch.testing.assert_close(out.entropy, entropy, **tol)
        assert out.label_mask.tolist() == (target != -100).tolist()
        out.loss.backward()
        loss.backward()
        for p, q in zip(ref.parameters(), ours.parameters(), strict=True):
            torch.testing.assert_close(q.grad, p.grad, atol=1e-6 if device == "cpu" else 1e-5, rtol=1e-4)
            p.grad = q.grad = None


@pytest.mark.slow
def test_level_softmax_trains_on_id_labels_and_every_engine_call_scores_by_level(tmp_path):
    """model.id_softmax=level end to end: the run records it, the validation ranking during training and the
    loaded Recommender both score over each level's codes (the item probabilities of a trie holding every
    ID sum to 1), and evaluation ranks valid lists."""
    from genrec.decoding import Trie

    run, cfg = make_run(
        tmp_path,
        "level",
        [
            "model.id_softmax=level",
            "train.max_steps=20",
            "train.save_steps=10",
            "train.early_stopping_patience=2",
            "train.select_metric=ndcg@10",
            "train.valid_users=20",
        ],
    )
    summary = train(run, cfg)
    assert summary["id_softmax"] == "level" and run.trained_id_softmax() == "level"
    assert summary["eval_ndcg@10"] is not None
    losses = [json.loads(x)["loss"] for x in run.train_log_file.read_text().splitlines() if '"loss"' in x]
    # per ID token, a level softmax starts at about log(8 codes) = 2.1; the vocabulary's at log(~420) = 6
    assert losses[0] < 3.0
    rec = Recommender.load(run, device="cpu", search="exact")
    assert rec.engine.softmax is not None
    prompt = rec.engine.encode_messages(rec.builder.messages(rec.user_history(rec.data.users[0])))
    levels = rec.engine.softmax.groups
    every = np.stack(np.meshgrid(*levels, indexing="ij"), -1).reshape(-1, len(levels)).tolist()
    (r,) = rec.engine.rank([prompt], [Trie(every)], beam_width=len(every))
    assert float(np.exp(r.scores).sum()) == pytest.approx(1.0, abs=1e-4)
    report = evaluate(run, apply_overrides(cfg, ["eval.baselines=[popularity]"]), progress=False)
    assert report["results"]["genrec"]["validity"] == 1.0 and report["results"]["genrec"]["full_lists"] == 1.0


@pytest.mark.slow
def test_input_tokens_are_read_from_the_prompt_and_answers_stay_codes(tmp_path):
    from genrec.errors import GenrecError
    from genrec.training import prompt_builder

    run, cfg = make_run(
        tmp_path, "inp", ["ids.input_tokens=true", "prompt.template=ids_items", "train.max_steps=10"]
    )
    data, ids = run.load_data(), run.load_ids()
    seq = data.sequences[0]
    text = prompt_builder(run, cfg, data, ids).messages(seq[:-1])[-1]["content"]
    shown = seq[:-1][-cfg.prompt.max_history :]
    assert "".join(f"{ids.item_string(i)}{ids.input_token(i)} " for i in shown) in text
    summary = train(run, cfg)
    assert summary["steps"] == 10
    rec = Recommender.load(run, device="cpu")
    assert set(ids.vocabulary()) <= set(rec.engine.tokenizer.get_vocab())
    hist = rec.user_history(rec.data.users[3])
    for mode in ("all", "retriever"):
        recs = rec.rank_histories(
            [hist], options=RankingOptions(n_items=5, candidates=mode, n_candidates=30)
        )[0]
        assert len({r.item for r in recs}) == 5 and not {r.item for r in recs} & set(hist)
    # a template that does not show the input tokens would train rows that are never read: refused
    with pytest.raises(GenrecError, match="does not render the history items' input tokens"):
        train(run, apply_overrides(cfg, ["prompt.template=ids_only"]))


def test_training_anew_rebuilds_the_base_from_the_config_and_resuming_keeps_it(tmp_path):
    """A changed model setting takes effect on a run that was trained before (its base/ was reused silently);
    the same settings give the same base; --resume keeps the base its checkpoints were made from."""
    from genrec.training import prepare_model, prompt_builder

    run, cfg = make_run(tmp_path, "base")
    data, ids = run.load_data(), run.load_ids()

    def base(c, resume=False):
        model, _ = prepare_model(run, c, prompt_builder(run, c, data, ids), data, resume=resume)
        return model

    first = base(cfg)
    again = base(cfg)
    for p, q in zip(first.parameters(), again.parameters(), strict=True):
        torch.testing.assert_close(p, q)  # deterministic
    wider = apply_overrides(cfg, ["model.intermediate_size=128"])
    assert base(wider).config.intermediate_size == 128
    assert base(cfg, resume=True).config.intermediate_size == 128  # resume: base/ as it is


@pytest.mark.slow
def test_an_interrupted_evaluation_resumes_without_ranking_or_training_again(
    trained, tmp_path, monkeypatch, caplog
):
    """Killed in SASRec after genrec's second chunk of users and the other baselines: `--resume` ranks nobody
    again, trains only SASRec, and reports what a whole evaluation reports. A changed input is not reused."""
    import logging
    import shutil

    from genrec import baselines, evaluation
    from genrec.run import RunDir

    run = RunDir(tmp_path / "run")
    shutil.copytree(
        trained[0].path, run.path, ignore=shutil.ignore_patterns("checkpoints", "eval_*", "report_*")
    )
    cfg = trained[1]
    whole = evaluate(run, cfg, progress=False)
    assert not (run / "eval_test.parts").exists()  # removed once the report is written

    monkeypatch.setattr(evaluation, "GENREC_CHUNK_USERS", 16)  # 40 users: chunks of 16, 16 and 8
    real_sasrec = baselines.sasrec_lists

    kept_state = []

    def killed(*a, **kw):
        kept_state.append(kw.get("checkpoint"))
        raise KeyboardInterrupt

    monkeypatch.setattr(baselines, "sasrec_lists", killed)
    with pytest.raises(KeyboardInterrupt), caplog.at_level(logging.WARNING, logger="genrec.evaluation"):
        evaluate(run, cfg, progress=False)
    parts = run / "eval_test.parts"
    assert sorted(p.name for p in parts.iterdir()) == [
        "genrec-00000.json", "genrec-00001.json", "genrec-00002.json",
        "itemknn.json", "markov.json", "popularity.json", "retriever.json",
    ]  # fmt: skip
    assert f"`genrec evaluate --run {run.path} --resume`" in caplog.text
    assert kept_state == [parts / "sasrec.state.pt"]  # SASRec keeps its training state there, epoch by epoch

    # resumed: genrec ranks no user, and no baseline but SASRec runs again
    rec = Recommender.load(run, device="cpu")
    monkeypatch.setattr(baselines, "sasrec_lists", real_sasrec)
    for name in ("itemknn_lists", "markov_lists", "retriever_lists"):
        monkeypatch.setattr(baselines, name, killed)
    ranked = rec.engine.ranked_by.copy()
    resumed = evaluate(run, cfg, rec=rec, progress=False, resume=True)
    assert rec.engine.ranked_by == ranked
    assert resumed["results"] == whole["results"] and resumed["genrec_vs"] == whole["genrec_vs"]
    assert resumed["ranked_by"] == whole["ranked_by"]
    assert resumed["resumed"] == ["genrec", "popularity", "itemknn", "markov", "retriever"]
    assert (
        "lists of genrec, popularity, itemknn, markov, retriever were kept"
        in (run / "report_test.md").read_text()
    )
    assert not parts.exists()


@pytest.mark.slow
def test_a_resumed_evaluation_ranks_again_what_changed(trained, tmp_path, monkeypatch, caplog):
    """genrec's chunks made by another model are ranked again (the log names the input); without --resume an
    interrupted evaluation's lists are removed, not used."""
    import logging
    import shutil

    from genrec import evaluation
    from genrec.run import RunDir

    run = RunDir(tmp_path / "run")
    shutil.copytree(
        trained[0].path, run.path, ignore=shutil.ignore_patterns("checkpoints", "eval_*", "report_*")
    )
    cfg = apply_overrides(trained[1], ["eval.baselines=[popularity]"])
    monkeypatch.setattr(evaluation, "GENREC_CHUNK_USERS", 16)
    rec = Recommender.load(run, device="cpu")
    real = rec.rank_stream
    seen = []

    def dies_after_two_batches(prepared):
        for out in real(prepared):
            seen.append(len(out[1]))
            if len(seen) == 2:
                raise KeyboardInterrupt
            yield out

    monkeypatch.setattr(rec, "rank_stream", dies_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        evaluate(run, cfg, rec=rec, progress=False)
    assert [p.name for p in (run / "eval_test.parts").iterdir()] == [
        "genrec-00000.json"
    ]  # 16 users, one batch
    monkeypatch.setattr(rec, "rank_stream", real)

    ranked = sum(rec.engine.ranked_by.values())
    first = evaluate(run, cfg, rec=rec, progress=False, resume=True)  # ranks the 24 users after the chunk
    assert sum(rec.engine.ranked_by.values()) - ranked == 24 and first["resumed"] == ["genrec"]

    # the same interruption, then the model's weights written again: the kept chunk is not used
    monkeypatch.setattr(rec, "rank_stream", dies_after_two_batches)
    seen.clear()
    with pytest.raises(KeyboardInterrupt):
        evaluate(run, cfg, rec=rec, progress=False)
    monkeypatch.setattr(rec, "rank_stream", real)
    weights = next(run.merged_dir.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes())
    ranked = sum(rec.engine.ranked_by.values())
    with caplog.at_level(logging.WARNING, logger="genrec.evaluation"):
        again = evaluate(run, cfg, rec=rec, progress=False, resume=True)
    assert sum(rec.engine.ranked_by.values()) - ranked == 40 and "resumed" not in again
    assert "genrec-00000.json: made with another model; made again" in caplog.text
    assert again["results"] == first["results"]

    # without --resume, an interrupted evaluation's lists are removed first
    monkeypatch.setattr(rec, "rank_stream", dies_after_two_batches)
    seen.clear()
    with pytest.raises(KeyboardInterrupt):
        evaluate(run, cfg, rec=rec, progress=False)
    monkeypatch.setattr(rec, "rank_stream", real)
    ranked = sum(rec.engine.ranked_by.values())
    assert "resumed" not in evaluate(run, cfg, rec=rec, progress=False)
    assert sum(rec.engine.ranked_by.values()) - ranked == 40
