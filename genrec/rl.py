"""Reinforcement learning after SFT: GRPO (TRL's GRPOTrainer) with a ranking reward under the constrained search.

MiniOneRec trains its SFT model further with GRPO, the completions of a prompt being the items a constrained
beam search returns. This module does the same with genrec's own ranking: a rollout (`Rollouts`, TRL's
experimental `rollout_func`) ranks a training example's history exactly as `genrec evaluate` does (the run's
candidates, the model being trained) and its `rl.group` first items are the group's completions: each item's ID
tokens, then the end-of-turn token the SFT answers end with. So every completion is a distinct, real
catalogue item from the request's candidates, and the policy is pushed on the lists it will serve. Rewards
(`group_rewards`, rl.reward) read the example's target from the dataset.

Log-probabilities are those genrec ranks with: TRL's per-token log-probs go through training's
`labelled_positions_head`, which normalises each ID token over its model.id_softmax group, and the end-of-turn
token is masked out of the loss (as SFT's history-loss rows leave it untrained; the search never writes it).

The stage (`train_rl`) starts from the SFT model, compares it with the RL model on the validation users and keeps
the RL model in merged/ only where rl.keep says so (the SFT model then moves to merged-sft/). Until the stage
ends no model of the run changes (only rl_log.jsonl is written), so a crash or Ctrl-C leaves the SFT model as it
was. Knows nothing of the CLI.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genrec.config import RankingOptions, RunConfig
from genrec.data import Example, Interactions, train_examples, without_items
from genrec.errors import GenrecError, stopped_by
from genrec.evaluation import fused_validation_users
from genrec.evaluation.metrics import ci_half_width, user_metrics
from genrec.ids import ItemIds
from genrec.prep import model_lists
from genrec.recommender import Recommender, history_requests, load_retrieval
from genrec.retrieval import Retriever
from genrec.run import RunDir
from genrec.training import (
    in_memory_recommender,
    labelled_positions_head,
    lora_config,
    loss_log_callback,
    prompt_builder,
    training_softmax,
    use_lora,
    validation_users,
)

logger = logging.getLogger(__name__)

RL_OUTPUT = "rl_checkpoints"
"""The GRPO trainer's output folder in the run: it saves nothing there (save_strategy=no); removed after."""


def prompt_key(messages: Sequence[dict[str, Any]]) -> str:
    """A rendered prompt as a dict key: TRL hands `rollout_func` the prompts alone, not their dataset rows."""
    return json.dumps(list(messages), sort_keys=True)


def rl_examples(data: Interactions, cfg: RunConfig, *, cold: Sequence[int] = ()) -> list[Example]:
    """The RL prompts' examples: the last rl.examples_per_user next-item positions of each user's training part
    (never a validation or test target), none with a held-out item (data.cold_items) as target or in its history."""
    held_out = set(cold)
    return [
        ex
        for ex in train_examples(without_items(data, held_out), per_user=cfg.rl.examples_per_user)
        if ex.target not in held_out
    ]


def group_rewards(items: Sequence[int], target: int, kind: str) -> list[float]:
    """Rewards of one group's completions, `items` in rank order (best first). `hit`: 1 for the target, else 0.
    `rank` (MiniOneRec's rule + ranking reward): 1 for the target; a wrong item at rank r (from 0) gets
    -1/log2(r + 2), scaled so the wrong items' penalties sum to -1: a wrong item ranked first costs most."""
    if kind == "hit":
        return [1.0 if i == target else 0.0 for i in items]
    if kind != "rank":
        raise ValueError(f"rl.reward must be 'rank' or 'hit', got {kind!r}")
    weights = [0.0 if i == target else 1.0 / math.log2(r + 2) for r, i in enumerate(items)]
    total = sum(weights)
    return [1.0 if i == target else -w / total for i, w in zip(items, weights, strict=True)]


@dataclasses.dataclass
class RewardStats:
    """What the rewards were over the whole stage (TRL logs them per logging step only)."""

    total: float = 0.0
    completions: int = 0
    groups: int = 0
    hits: int = 0
    """Groups that held the target."""

    def summary(self) -> dict[str, float]:
        return {
            "reward_mean": round(self.total / max(self.completions, 1), 4),
            "target_in_group": round(self.hits / max(self.groups, 1), 4),
        }


def reward_function(group: int, kind: str, stats: RewardStats) -> Any:
    """TRL's reward function: the completions arrive as consecutive groups of `group` (its RepeatSampler);
    `target` is the dataset column, `item` and `rank` come from `Rollouts`."""

    def ranking_reward(
        completions: Sequence[Any], target: Sequence[int], item: Sequence[int], **_: Any
    ) -> list[float]:
        out: list[float] = []
        for s in range(0, len(item), group):
            items = list(item[s : s + group])
            out += group_rewards(items, int(target[s]), kind)
            stats.groups += 1
            stats.hits += int(target[s]) in items
        stats.total += sum(out)
        stats.completions += len(out)
        return out

    ranking_reward.__name__ = f"{kind}_reward"  # TRL logs each reward function under its name
    return ranking_reward


class Rollouts:
    """TRL's `rollout_func`: each group of identical prompts gets the top `group` items of genrec's constrained
    ranking of its example's history, by the model being trained (candidates, search and softmax as the run
    ranks), as completion token ids with their per-token log-probs under that model."""

    def __init__(
        self,
        run: RunDir,
        cfg: RunConfig,
        data: Interactions,
        ids: ItemIds,
        examples: dict[str, Example],
        *,
        collab: Any = None,
        fusion_weight: float = 0.0,
        held_out: Sequence[int] = (),
    ) -> None:
        self.run, self.cfg, self.data, self.ids, self.examples = run, cfg, data, ids, examples
        self.collab, self.fusion_weight = collab, fusion_weight
        self.held_out = list(held_out)
        """Items held out of training (data.cold_items): never rolled out, their tokens outside the softmax."""
        self.group = cfg.rl.group
        e = cfg.eval
        self.options = RankingOptions(
            n_items=self.group,
            candidates=e.candidates,
            n_candidates=e.n_candidates,
            beam_width=max(self.group, e.beam_width),
        )
        self.retriever = Retriever(run.load_embeddings())
        self.rec: Recommender | None = None
        self._model: Any = None

    def recommender(self, model: Any, tokenizer: Any) -> Recommender:
        """A Recommender over the model being trained (built once: the tries and user index do not change)."""
        if self.rec is None or self._model is not model:
            self.rec = in_memory_recommender(
                self.run,
                self.cfg,
                self.data,
                self.ids,
                model,
                tokenizer,
                retriever=self.retriever,
                collab=self.collab,
                fusion_weight=self.fusion_weight,
                held_out=self.held_out,
            )
            self._model = model
        return self.rec

    def __call__(self, prompts: list[Any], trainer: Any) -> dict[str, list[Any]]:
        model = policy_model(trainer)
        was_training = model.training
        try:
            with torch.no_grad():
                return self.rollout(prompts, model, trainer.processing_class)
        finally:
            model.train(was_training)

    def rollout(self, prompts: list[Any], model: Any, tokenizer: Any) -> dict[str, list[Any]]:
        g = self.group
        if len(prompts) % g:
            raise GenrecError(f"RL rollout: {len(prompts)} prompts are not groups of rl.group={g}")
        heads = prompts[::g]
        for k, p in enumerate(heads):  # TRL's RepeatSampler repeats each prompt `group` times in a row
            assert all(q == p for q in prompts[k * g : (k + 1) * g]), "a group mixes prompts"
        rec = self.recommender(model, tokenizer)
        exs = [self.examples[prompt_key(p)] for p in heads]
        reqs = history_requests([ex.history for ex in exs], self.options, users=[ex.user for ex in exs])
        for r, p in zip(reqs, heads, strict=True):
            r.messages = list(p)  # the dataset's rendering, so prompt ids are the trainer's
        prepared = rec.prepare(reqs)
        ranked = rec.rank_prepared(reqs, prepared)
        eos = int(tokenizer.eos_token_id)
        out: dict[str, list[Any]] = {k: [] for k in ("prompt_ids", "completion_ids", "logprobs", "env_mask")}
        out.update(item=[], rank=[])
        for ex, lst, prompt in zip(exs, ranked, prepared.prompts, strict=True):
            if len(lst) < g:
                raise GenrecError(
                    f"RL rollout: user {ex.user!r} has {len(lst)} candidates, fewer than rl.group={g}: lower "
                    "rl.group or raise eval.n_candidates"
                )
            items = [r.item for r in lst]
            comps = [[*rec.item_tokens[i].tolist(), eos] for i in items]
            out["prompt_ids"] += [list(prompt)] * g
            out["completion_ids"] += comps
            out["logprobs"] += completion_log_probs(model, list(prompt), comps)
            # the loss is on the ID tokens alone: the search never writes the end-of-turn token
            out["env_mask"] += [[1] * (len(c) - 1) + [0] for c in comps]
            out["item"] += items
            out["rank"] += list(range(g))
        return out


def policy_model(trainer: Any) -> Any:
    """The model the trainer optimises, as genrec's engine drives it: unwrapped, and for LoRA the base model
    with the adapters injected in its layers (they act on every forward through it)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def completion_log_probs(model: Any, prompt: list[int], completions: list[list[int]]) -> list[list[float]]:
    """Per-token log-probs of each completion after `prompt`, through the model's fused LM head (TRL's, wrapped by
    training.labelled_positions_head: the model.id_softmax that GRPO's loss uses). The completions of a group have
    one length (every item's ID has the run's depth), so one unpadded batch scores them."""
    ids = torch.tensor([prompt + c for c in completions], device=model.device)
    labels = ids.clone()
    labels[:, : len(prompt)] = -100
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, fused_lm_head=True)
    return [row.tolist() for row in out.log_probs[:, len(prompt) - 1 :].float().cpu()]


def validation_ndcg(rec: Recommender, valid: Sequence[Example], cfg: RunConfig) -> dict[str, Any]:
    """Validation NDCG@10 of the model behind `rec` (`ndcg@10`) and each user's (`per_user`, in `valid`'s order),
    ranked as the run will rank: with a collaborative retriever, its candidates fused at the configured weight,
    or for retrieval.fusion_weight=auto at the best weight of retrieval.fusion_grid (the weight is chosen after
    this stage, so each model is judged at its own best); else the LM alone over the run's candidates."""
    model = rec.engine.model  # type: ignore[attr-defined]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if rec.collab is not None and cfg.eval.candidates == "retriever":
                w = cfg.retrieval.fusion_weight
                weights = cfg.retrieval.fusion_grid if w == "auto" else [float(w)]
                by_n, _, _ = fused_validation_users(rec, valid, cfg, weights)
                grid = by_n[str(cfg.eval.n_candidates)]
                best = max(weights, key=lambda x: (float(grid[f"{x:g}"].mean()), -x))
                users = grid[f"{best:g}"]
                return {"ndcg@10": float(users.mean()), "per_user": users, "fusion_weight": float(best)}
            lists = model_lists(rec, valid, cfg)
    finally:
        model.train(was_training)
    users = np.array(
        [user_metrics(lst, ex.target, [10])["ndcg@10"] for lst, ex in zip(lists, valid, strict=True)]
    )
    return {"ndcg@10": float(users.mean()), "per_user": users}


def rl_gain(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """The RL model's validation NDCG@10 minus the SFT model's, user by user: the mean of the differences and its
    95% interval (mean ± 1.96 standard errors of the paired differences)."""
    d = np.asarray(after["per_user"], dtype=np.float64) - np.asarray(before["per_user"], dtype=np.float64)
    mean, half = float(d.mean()), ci_half_width(d)
    return {"diff": round(mean, 4), "low": round(mean - half, 4), "high": round(mean + half, 4)}


def keeps_rl_model(keep: str, gain: dict[str, float]) -> bool:
    """rl.keep's rule on the paired validation gain (`rl_gain`)."""
    if keep == "always":
        return True
    if keep == "significant":
        return gain["low"] > 0  # nan (a single validation user) is no evidence
    return gain["diff"] > 0


def grpo_config(run: RunDir, cfg: RunConfig, *, completion_length: int) -> Any:
    """TRL's GRPOConfig for the stage: one rollout per optimizer step (rl.users prompts x rl.group completions,
    on-policy, so no importance sampling), nothing saved by the trainer (the stage saves what it keeps)."""
    from trl import GRPOConfig

    r, t = cfg.rl, cfg.train
    cuda = torch.cuda.is_available()
    bf16 = t.bf16 if t.bf16 is not None else bool(cuda and torch.cuda.is_bf16_supported())
    return GRPOConfig(
        output_dir=str(run.path / RL_OUTPUT),
        max_steps=r.steps,
        per_device_train_batch_size=r.users * r.group,
        gradient_accumulation_steps=1,
        num_generations=r.group,
        max_completion_length=completion_length,
        learning_rate=r.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=0,
        beta=r.beta,
        disable_dropout=True,  # the rollout ranked without dropout: the loss must see the same model
        logging_steps=max(1, min(t.logging_steps, r.steps)),
        save_strategy="no",
        report_to="none",
        seed=r.seed,
        bf16=bf16,
        use_cpu=not cuda,
        gradient_checkpointing=(
            t.gradient_checkpointing if t.gradient_checkpointing is not None else cfg.model.base != "tiny"
        ),
        dataloader_num_workers=0,
        disable_tqdm=False,
    )


def sft_model_dir(run: RunDir) -> Path:
    """Where the SFT model is: merged-sft/ while merged/ holds an earlier RL stage's model, else merged/."""
    if run.merged_sft_dir.is_dir():
        return run.merged_sft_dir
    return run.model_dir()


def train_rl(run: RunDir, cfg: RunConfig) -> dict[str, Any]:
    """The RL stage on the run's SFT model: rl.steps GRPO steps, then validation NDCG@10 before and after on the
    first train.valid_users validation users; keeps the RL model per rl.keep and records `rl` in run.json."""
    from genrec.modeling import load_trained

    r = cfg.rl
    cold = run.cold_items(cfg)
    data = without_items(run.load_data(), cold)
    ids = run.load_ids()
    valid = validation_users(data, cfg, cold)
    model, tokenizer = load_trained(sft_model_dir(run).resolve())
    collab, weight = load_retrieval(run, cfg)
    retriever = Retriever(run.load_embeddings())

    def judged(m: Any) -> dict[str, Any]:
        rec = in_memory_recommender(
            run, cfg, data, ids, m, tokenizer, retriever=retriever, collab=collab, held_out=cold
        )
        return validation_ndcg(rec, valid, cfg)

    before = judged(model)
    logger.info("RL: SFT model's validation NDCG@10 %.4f (%d users)", before["ndcg@10"], len(valid))
    rows, examples = rl_dataset(prompt_builder(run, cfg, data, ids), rl_examples(data, cfg, cold=cold))
    stats = RewardStats()
    # auto: the weight is chosen after this stage (one recorded was chosen for the SFT model): the LM's own order
    rollout_weight = 0.0 if cfg.retrieval.fusion_weight == "auto" or weight is None else weight
    rollouts = Rollouts(
        run, cfg, data, ids, examples, collab=collab, fusion_weight=rollout_weight, held_out=cold
    )
    trainer = grpo_trainer(run, cfg, model, tokenizer, rows, rollouts=rollouts, stats=stats)
    logger.info(
        "RL: %d steps of %d prompts x %d completions from %d training examples (reward %s)",
        r.steps,
        r.users,
        r.group,
        len(rows),
        r.reward,
    )
    started = time.time()
    try:
        trainer.train()
    except BaseException as e:  # Ctrl-C, out of memory: nothing of the run was changed yet
        logger.warning(
            "RL stage %s at step %d; the run's models are as they were",
            stopped_by(e),
            trainer.state.global_step,
        )
        raise
    finally:
        shutil.rmtree(run.path / RL_OUTPUT, ignore_errors=True)  # save_strategy=no: at most an empty folder
    seconds = time.time() - started
    after = judged(policy_model(trainer))
    gain = rl_gain(before, after)
    kept = keeps_rl_model(r.keep, gain)
    logger.info(
        "RL: validation NDCG@10 %.4f -> %.4f (paired difference %+.4f [%+.4f, %+.4f], %d users): %s (rl.keep=%s)",
        before["ndcg@10"],
        after["ndcg@10"],
        gain["diff"],
        gain["low"],
        gain["high"],
        len(valid),
        "kept" if kept else "SFT model kept",
        r.keep,
    )
    final: Any = trainer.model
    if kept:
        keep_rl_model(
            run, final.merge_and_unload() if hasattr(final, "merge_and_unload") else final, tokenizer
        )
        run.drop_model_choices()  # weights chosen for the SFT model; `train` chooses again for this one
    else:
        restore_sft_model(run)
    summary = {
        "steps": trainer.state.global_step,
        "seconds": round(seconds, 1),
        "users_per_step": r.users,
        "group": r.group,
        "reward": r.reward,
        "learning_rate": r.learning_rate,
        "beta": r.beta,
        "prompts": len(rows),
        **stats.summary(),
        "rollout_fusion_weight": rollout_weight,
        "valid_users": len(valid),
        "valid_ndcg@10_sft": round(before["ndcg@10"], 4),
        "valid_ndcg@10_rl": round(after["ndcg@10"], 4),
        "valid_ndcg@10_gain": gain,
        **({"valid_fusion_weight_sft": before["fusion_weight"]} if "fusion_weight" in before else {}),
        **({"valid_fusion_weight_rl": after["fusion_weight"]} if "fusion_weight" in after else {}),
        "keep": r.keep,
        "kept": kept,
        "method": "lora" if use_lora(cfg) else "full",
    }
    run.update_meta(rl=summary)
    return summary


def rl_dataset(builder: Any, exs: Sequence[Example]) -> tuple[list[dict[str, Any]], dict[str, Example]]:
    """GRPO's rows (the rendered prompt, the target) and each prompt's example by `prompt_key`. A prompt rendered
    the same for two examples is kept once: the rollout could rank only one of their histories."""
    examples: dict[str, Example] = {}
    rows = []
    for ex in exs:
        messages = builder.messages(ex.history, ex.user)
        key = prompt_key(messages)
        if key not in examples:
            examples[key] = ex
            rows.append({"prompt": messages, "target": ex.target})
    return rows, examples


def grpo_trainer(
    run: RunDir,
    cfg: RunConfig,
    model: Any,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    *,
    rollouts: Rollouts,
    stats: RewardStats,
) -> Any:
    """TRL's GRPOTrainer over the SFT model (a new LoRA adapter for pretrained bases, as SFT trains), its LM head
    (and the reference model's) scoring ID tokens under model.id_softmax, as genrec ranks."""
    from datasets import Dataset
    from trl import GRPOTrainer

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is experimental in TRL 1.16: pinned
    ids = rollouts.ids
    if run.rl_log_file.exists():
        run.rl_log_file.unlink()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[reward_function(cfg.rl.group, cfg.rl.reward, stats)],
        args=grpo_config(run, cfg, completion_length=ids.depth + 1),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=(
            lora_config(cfg, model=model, tokenizer=tokenizer, id_tokens=ids.vocabulary())
            if use_lora(cfg)
            else None
        ),
        rollout_func=rollouts,
        callbacks=[loss_log_callback(run.rl_log_file)],
    )
    softmax = training_softmax(cfg, ids, rollouts.held_out, tokenizer)
    labelled_positions_head(policy_model(trainer), softmax)
    if trainer.ref_model is not None:  # the KL term must compare log-probs normalised alike
        labelled_positions_head(trainer.ref_model, softmax)
    return trainer


def keep_rl_model(run: RunDir, model: Any, tokenizer: Any) -> None:
    """merged/ becomes the RL model; the SFT model moves to merged-sft/ (kept there from an earlier RL stage).
    Written beside merged/ first, so that a failed save leaves merged/ as it was."""
    staging = run.path / "merged.rl-new"
    if staging.exists():
        shutil.rmtree(staging)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if run.merged_sft_dir.is_dir():
        shutil.rmtree(run.merged_dir)  # an earlier RL stage's model
    else:
        run.merged_dir.rename(run.merged_sft_dir)
    staging.rename(run.merged_dir)
    logger.info("RL model written to %s (the SFT model is in %s)", run.merged_dir, run.merged_sft_dir)


def restore_sft_model(run: RunDir) -> None:
    """merged/ holds the SFT model again (where an earlier RL stage had replaced it)."""
    if run.merged_sft_dir.is_dir():
        shutil.rmtree(run.merged_dir)
        run.merged_sft_dir.rename(run.merged_dir)
