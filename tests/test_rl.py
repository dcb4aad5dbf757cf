"""The RL stage after SFT (genrec.rl): rollouts from the constrained ranking, rewards, keeping or not, the CLI."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from genrec import rl
from genrec.cli import app
from genrec.config import ConfigError, RunConfig, apply_overrides
from genrec.data import without_items
from genrec.id_softmax import group_softmax, softmax_groups
from genrec.modeling import load_trained
from genrec.run import RunDir
from genrec.training import labelled_positions_head, prompt_builder
from tests.conftest import copy_run

runner = CliRunner()
SHORT = ["rl.steps=2", "rl.users=2", "rl.group=4", "train.valid_users=24"]


def weights_digest(folder) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def test_rank_reward_orders_wrong_items_by_rank():
    items = [7, 3, 9, 5]
    r = rl.group_rewards(items, 9, "rank")
    assert r[2] == 1.0
    wrong = [r[0], r[1], r[3]]
    assert all(x < 0 for x in wrong) and wrong[0] < wrong[1] < wrong[2]  # higher rank, harder push down
    assert math.isclose(sum(wrong), -1.0)
    assert math.isclose(wrong[0] / wrong[1], math.log2(3) / math.log2(2))
    miss = rl.group_rewards(items, 42, "rank")
    assert math.isclose(sum(miss), -1.0) and miss == sorted(miss)
    assert rl.group_rewards(items, 3, "hit") == [0.0, 1.0, 0.0, 0.0]
    assert rl.group_rewards(items, 42, "hit") == [0.0] * 4
    with pytest.raises(ValueError, match="rl.reward"):
        rl.group_rewards(items, 3, "ndcg")


def test_reward_function_reads_groups_and_counts_hits():
    stats = rl.RewardStats()
    fn = rl.reward_function(2, "hit", stats)
    out = fn(completions=[None] * 4, target=[5, 5, 8, 8], item=[5, 1, 2, 3], rank=[0, 1, 0, 1])
    assert out == [1.0, 0.0, 0.0, 0.0]
    assert stats.summary() == {"reward_mean": 0.25, "target_in_group": 0.5}


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("rl.group=1", "rl.group"),
        ("rl.steps=-1", "rl.steps"),
        ("rl.users=0", "rl.users"),
        ("rl.learning_rate=0", "rl.learning_rate"),
        ("rl.beta=-0.1", "rl.beta"),
        ("rl.reward=ndcg", "rl.reward"),
        ("rl.keep=never", "rl.keep"),
    ],
)
def test_config_errors_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        apply_overrides(RunConfig(), [override])


def test_rl_group_must_fit_the_candidates():
    with pytest.raises(ConfigError, match="rl.group"):
        apply_overrides(RunConfig(), ["rl.steps=5", "rl.group=50", "eval.n_candidates=20"])


def test_rl_is_off_by_default(trained_run):
    run, cfg, _ = trained_run
    assert RunConfig().rl.steps == 0 and cfg.rl.steps == 0
    assert "rl" not in run.meta()
    assert not run.merged_sft_dir.exists() and not run.rl_log_file.exists()


def policy(run: RunDir, cfg: RunConfig):
    """The run's model with the fused LM head GRPO scores through (TRL's, then genrec's restricted softmax)."""
    from trl.trainer.utils import add_fused_lm_head

    model, tokenizer = load_trained(run.merged_dir)
    add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    ids = run.load_ids()
    labelled_positions_head(
        model, group_softmax(softmax_groups(ids.level_tokens(), cfg.model.id_softmax), tokenizer)
    )
    return model, tokenizer


@pytest.mark.parametrize("candidates", ["all", "retriever"])
def test_rollouts_are_the_ranking_s_distinct_candidates(trained_run, candidates):
    run, cfg, _ = trained_run
    cfg = apply_overrides(cfg, [*SHORT, f"eval.candidates={candidates}", "eval.n_candidates=12"])
    data, ids = run.load_data(), run.load_ids()
    model, tokenizer = policy(run, cfg)
    builder = prompt_builder(run, cfg, data, ids)
    exs = rl.rl_examples(data, cfg)[:3]
    by_key = {rl.prompt_key(builder.messages(ex.history, ex.user)): ex for ex in exs}
    prompts = [builder.messages(ex.history, ex.user) for ex in exs for _ in range(4)]
    rollouts = rl.Rollouts(run, cfg, data, ids, by_key)
    out = rollouts.rollout(prompts, model, tokenizer)
    assert len(out["completion_ids"]) == len(out["logprobs"]) == len(out["prompt_ids"]) == 12
    rec = rollouts.rec
    assert rec is not None
    for k, ex in enumerate(exs):
        items = out["item"][4 * k : 4 * k + 4]
        assert len(set(items)) == 4 and not set(items) & set(ex.history)
        assert all(0 <= i < len(data.catalog) for i in items)
        assert out["rank"][4 * k : 4 * k + 4] == [0, 1, 2, 3]
        if candidates == "retriever":
            assert set(items) <= set(rec.retrieved(list(ex.history), n=12))
        lm = rec.rank_histories([ex.history], rollouts.options, users=[ex.user])[0]
        assert items == [r.item for r in lm]
        for j, item in enumerate(items):
            comp = out["completion_ids"][4 * k + j]
            assert comp == [*ids_of(tokenizer, ids.item_tokens(item)), tokenizer.eos_token_id]
            assert out["env_mask"][4 * k + j] == [1] * (len(comp) - 1) + [0]
            lp = out["logprobs"][4 * k + j]
            assert len(lp) == len(comp)
            # GRPO's per-token log-probs add up to the score genrec ranked the item by
            assert sum(lp[:-1]) == pytest.approx(lm[j].score, abs=1e-3)


def ids_of(tokenizer, tokens):
    return list(tokenizer.convert_tokens_to_ids(tokens))


def test_rl_through_genrec_train_records_and_keeps(trained_run, tmp_path_factory):
    # SFT alone, trained here (not the fixture's weights: another test may have changed torch's thread count,
    # and with it the sums' rounding), then SFT + RL from the same copy and seed
    alone = copy_run(trained_run[0], tmp_path_factory, "sft_only")
    done = runner.invoke(
        app, ["train", "--run", str(alone.path), *[a for s in SHORT for a in ("-s", s)], "-s", "rl.steps=0"]
    )
    assert done.exit_code == 0, done.output
    sft = weights_digest(alone.merged_dir)
    run = copy_run(trained_run[0], tmp_path_factory, "rl_train")
    result = runner.invoke(
        app, ["train", "--run", str(run.path), *[a for s in [*SHORT, "rl.keep=always"] for a in ("-s", s)]]
    )
    assert result.exit_code == 0, result.output
    assert "RL (rank reward, 2 steps" in result.output and "RL model kept" in result.output
    info = run.meta()["rl"]
    assert info["steps"] == 2 and info["kept"] is True and info["valid_users"] == 24
    assert {"valid_ndcg@10_sft", "valid_ndcg@10_rl", "seconds", "reward_mean", "target_in_group"} <= set(info)
    gain = info["valid_ndcg@10_gain"]
    assert gain["low"] <= gain["diff"] <= gain["high"]
    assert gain["diff"] == pytest.approx(info["valid_ndcg@10_rl"] - info["valid_ndcg@10_sft"], abs=2e-4)
    assert run.merged_sft_dir.is_dir() and weights_digest(run.merged_dir) != weights_digest(
        run.merged_sft_dir
    )
    assert weights_digest(run.merged_sft_dir) == sft  # SFT ran again, with the same seed: the same model
    logged = [json.loads(line) for line in run.rl_log_file.read_text().splitlines()]
    assert any("reward" in row for row in logged)
    assert not (run.path / "rl_checkpoints").exists()
    shown = runner.invoke(app, ["evaluate", "--run", str(run.path), "-s", "eval.baselines=[popularity]"])
    assert shown.exit_code == 0, shown.output
    line = "RL after SFT (rank reward, 2 steps of 2 users x 4 items"
    assert line in shown.output and "the RL model is the one evaluated" in shown.output
    assert f"paired difference {gain['diff']:+.4f} [{gain['low']:+.4f}, {gain['high']:+.4f}]" in shown.output
    assert line in (run.path / "report_test.md").read_text()


def test_keep_auto_keeps_the_sft_model_when_validation_does_not_improve(
    trained_run, tmp_path_factory, monkeypatch
):
    run = copy_run(trained_run[0], tmp_path_factory, "rl_auto")
    cfg = apply_overrides(run.load_config(), [*SHORT, "rl.keep=always"])
    sft = weights_digest(run.merged_dir)
    rl.train_rl(run, cfg)  # an earlier stage kept its model: merged/ is RL, merged-sft/ the SFT model
    assert weights_digest(run.merged_sft_dir) == sft and weights_digest(run.merged_dir) != sft
    users = iter([[1.0, 0.0] * 5, [1.0, 0.0, 1.0, 0.0, 0.0] * 2])  # SFT's, then RL's: RL did worse
    monkeypatch.setattr(rl, "validation_ndcg", lambda *a, **k: judged_as(next(users)))
    info = rl.train_rl(run, with_rl(cfg, keep="auto"))
    assert info["kept"] is False and info["valid_ndcg@10_sft"] == 0.5 and info["valid_ndcg@10_rl"] == 0.4
    assert info["valid_ndcg@10_gain"]["diff"] == -0.1
    assert weights_digest(run.merged_dir) == sft and not run.merged_sft_dir.exists()
    assert run.meta()["rl"]["kept"] is False


def judged_as(per_user: list[float]) -> dict:
    """What rl.validation_ndcg returns for these per-user NDCG@10 values."""
    return {"ndcg@10": float(np.mean(per_user)), "per_user": np.array(per_user)}


def test_keep_decides_on_the_paired_validation_difference():
    """The gain is the mean of the per-user differences with its 95% interval; `auto` keeps a higher mean,
    `significant` only an interval above zero, `always` anything."""
    sft = judged_as([0.0, 0.5, 1.0, 0.2] * 10)
    small = judged_as([0.0, 0.5, 1.0, 0.3] * 9 + [1.0, 0.5, 1.0, 0.2])  # one user much better, one a little
    broad = judged_as([0.5, 0.6, 1.0, 0.3] * 10)  # every fourth user better by 0.1, the first by 0.5
    worse = judged_as([0.0, 0.5, 0.9, 0.2] * 10)
    g = rl.rl_gain(sft, small)
    d = np.array(small["per_user"]) - np.array(sft["per_user"])
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
    assert g == {
        "diff": round(d.mean(), 4),
        "low": round(d.mean() - half, 4),
        "high": round(d.mean() + half, 4),
    }
    assert g["diff"] > 0 > g["low"]
    assert rl.rl_gain(sft, broad)["low"] > 0
    decisions = {
        keep: [rl.keeps_rl_model(keep, rl.rl_gain(sft, after)) for after in (small, broad, worse)]
        for keep in ("auto", "significant", "always")
    }
    assert decisions == {
        "auto": [True, True, False],
        "significant": [False, True, False],
        "always": [True, True, True],
    }


def with_rl(cfg: RunConfig, **changes) -> RunConfig:
    return apply_overrides(cfg, [f"rl.{k}={v}" for k, v in changes.items()])


def test_a_crash_mid_rl_leaves_the_sft_model(trained_run, tmp_path_factory, monkeypatch):
    from trl import GRPOTrainer

    run = copy_run(trained_run[0], tmp_path_factory, "rl_crash")
    sft = weights_digest(run.merged_dir)
    before = run.meta()

    def interrupted(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(GRPOTrainer, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        rl.train_rl(run, apply_overrides(run.load_config(), [*SHORT, "rl.keep=always"]))
    assert weights_digest(run.merged_dir) == sft and not run.merged_sft_dir.exists()
    assert run.meta() == before


def test_rl_prompts_are_training_examples_only(trained_run):
    run, cfg, _ = trained_run
    data = run.load_data()
    cold = [0, 1, 2]
    exs = rl.rl_examples(data, apply_overrides(cfg, ["rl.examples_per_user=2"]), cold=cold)
    assert exs and all(ex.target not in cold and not set(ex.history) & set(cold) for ex in exs)
    sequences = dict(zip(data.users, without_items(data, cold).sequences, strict=True))
    for ex in exs:  # the next item of a prefix of the training part: never the validation or test target
        train_part = sequences[ex.user][:-2]
        assert list(ex.history) == train_part[: len(ex.history)] and train_part[len(ex.history)] == ex.target
    assert max(sum(ex.user == u for ex in exs) for u in sequences) == 2


def test_lora_rl_trains_an_adapter_and_merges(tmp_path):
    """A LoRA-trained run (as pretrained bases are) gets a new adapter in the RL stage, merged into merged/."""
    from genrec.training import train
    from tests.conftest import make_run

    run, cfg = make_run(tmp_path, "lora", ["train.method=lora", "train.max_steps=10"])
    train(run, cfg)
    sft = weights_digest(run.merged_dir)
    info = rl.train_rl(run, apply_overrides(cfg, [*SHORT, "rl.keep=always", "rl.learning_rate=0.01"]))
    assert info["method"] == "lora" and info["kept"] and info["steps"] == 2
    assert weights_digest(run.merged_sft_dir) == sft and weights_digest(run.merged_dir) != sft
    model, _ = load_trained(run.merged_dir)
    assert not hasattr(model, "peft_config")  # a plain model: what every engine loads


def test_merge_refuses_to_replace_a_kept_rl_model_with_the_sft_adapter(tmp_path):
    from genrec.errors import GenrecError
    from genrec.run import RunDir
    from genrec.training import merge

    run = RunDir(tmp_path / "r")
    run.path.mkdir(parents=True)
    run.update_meta(rl={"kept": True}, train={"steps": 1})
    with pytest.raises(GenrecError, match="holds the RL model"):
        merge(run)
    run.drop_meta("rl")  # what a new SFT does: the RL record no longer describes merged/
    assert run.meta() == {"train": {"steps": 1}}
