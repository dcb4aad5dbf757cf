"""Supervised fine-tuning with TRL: prompt-completion chat data, completion-only loss.

`tiny` bases are trained in full; pretrained bases get LoRA adapters (PEFT) with the ID tokens'
embedding and LM-head rows trainable (`trainable_token_indices`; see lora_config), so new ID
tokens learn. After training, the servable model is written to runs/<name>/merged (LoRA merged with merge_and_unload).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import shutil
import time
import types
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from genrec.config import RunConfig
from genrec.data import (
    Example,
    Interactions,
    augment_examples,
    history_windows,
    leave_one_out,
    train_examples,
    without_items,
)
from genrec.errors import GenrecError, stopped_by
from genrec.id_softmax import IdSoftmax, group_softmax, softmax_groups
from genrec.ids import ItemIds
from genrec.modeling import (
    add_id_tokens,
    build_tiny,
    id_token_vectors,
    init_id_embeddings,
    load_pretrained,
    set_id_rows,
    text_token_vectors,
    train_tokenizer,
)
from genrec.run import RunDir
from genrec.task_rows import item_rows_items, need_examples, needs_of, rfind, single_item_rows
from genrec.templates.prompt_store import TemplateStore
from genrec.templates.prompts import PromptBuilder

logger = logging.getLogger(__name__)


def prompt_builder(
    run: RunDir, cfg: RunConfig, data: Interactions, ids: ItemIds, *, template: str | None = None
) -> PromptBuilder:
    """The builder for a template (None: the run's, prompt.template) at its active version (templates/, else
    genrec/templates/builtin/)."""
    _, template_obj = TemplateStore.for_run(run.path).template(template or cfg.prompt.template)
    return PromptBuilder.for_config(template_obj, data.catalog, ids, cfg.prompt)


def sft_rows(builder: PromptBuilder, examples: list[Any]) -> list[dict[str, Any]]:
    """Conversational prompt-completion rows, the format TRL masks to completion-only loss."""
    return [
        {
            "prompt": builder.messages(ex.history, ex.user),
            "completion": [{"role": "assistant", "content": builder.target(ex.target)}],
        }
        for ex in examples
    ]


def check_input_tokens(builder: PromptBuilder, data: Interactions) -> None:
    """ids.input_tokens needs a template that renders them ({{ item.token }}); else their rows are never read."""
    if not builder.ids.input_items:
        return
    seq = next((s for s in data.sequences if len(s) >= 2), None)
    if seq is None:
        return
    text = "".join(m["content"] for m in builder.messages(seq[:-1]))
    shown = list(seq[:-1])[-builder.max_history :]
    if not any(builder.ids.input_token(i) and builder.ids.input_token(i) in text for i in shown):
        raise GenrecError(
            f"ids.input_tokens is on, but template {builder.template.name!r} ({builder.template.source}) does not "
            "render the history items' input tokens: add {{ item.token }} after {{ item.sid }} (as "
            "genrec/templates/builtin/ids_items.jinja does), or set ids.input_tokens=false and run `genrec build-ids --force` (it "
            "deletes the run's earlier model)"
        )


def history_loss_rows(
    builder: PromptBuilder,
    tokenizer: Any,
    examples: list[Example],
    *,
    max_length: int | None = None,
    history: bool = True,
    queries: Sequence[str] | None = None,
) -> tuple[list[dict[str, list[int]]], int]:
    """Tokenized rows whose loss is on ID tokens only: the answer's and (train.history_loss) those of every
    shown history item after the first (each predicted from the items before it). The end-of-turn tokens
    after the answer are not trained: constrained decoding never needs them, and on amazon-scientific
    training them too cut the validation NDCG@10 after one epoch by 40% (BENCHMARKS.md). TRL trains on
    `input_ids` + `labels` rows as they are. `history=False`: the answer's ID only (validation rows, so
    that the validation loss is the answer's, and every row under a restricted model.id_softmax without the
    history loss). `queries`: each example's need, shown by the builder's template (need rows). Rows longer
    than `max_length` tokens are left out; returns (rows, how many)."""
    item_tokens: dict[int, list[int]] = {}

    def tokens_of(item: int) -> list[int]:
        if item not in item_tokens:
            item_tokens[item] = list(tokenizer.convert_tokens_to_ids(builder.ids.item_tokens(item)))
        return item_tokens[item]

    rows, too_long = [], 0
    for k_ex, ex in enumerate(
        tqdm(examples, desc="tokenizing", unit="row", leave=False, disable=len(examples) < 10_000)
    ):
        prompt = builder.messages(ex.history, ex.user, query=queries[k_ex] if queries is not None else None)
        completion = [{"role": "assistant", "content": builder.target(ex.target)}]
        full = list(
            tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"]
        )
        labels = [-100] * len(full)
        answer = tokens_of(ex.target)
        n = rfind(full, answer)  # the answer is the last time its ID appears: the prompt ends before it
        if n < 0:
            raise GenrecError(f"train.history_loss: the tokenized row does not hold the answer's ID {answer}")
        labels[n : n + len(answer)] = answer
        at = 0
        for k, item in enumerate(list(ex.history)[-builder.max_history :] if history else []):
            toks = tokens_of(item)
            pos = _find(full, toks, at, n)
            if pos < 0:
                raise GenrecError(
                    f"train.history_loss: template {builder.template.name!r} does not show the history's item IDs "
                    f"oldest first (history item {builder.catalog.item_ids[item]!r}, number {k + 1}, is not in "
                    "the rendered prompt after the ones before it); render {{ item.sid }} for every history item "
                    "in order, or set train.history_loss=false"
                )
            if k:
                labels[pos : pos + len(toks)] = toks
            at = pos + len(toks)
        if max_length is not None and len(full) > max_length:
            too_long += 1
            continue
        rows.append({"input_ids": full, "labels": labels})
    return rows, too_long


def _find(seq: list[int], sub: list[int], start: int, stop: int) -> int:
    """First index >= start where `sub` lies wholly inside seq[:stop], else -1."""
    for i in range(start, stop - len(sub) + 1):
        if seq[i] == sub[0] and seq[i : i + len(sub)] == sub:
            return i
    return -1


def tokenizer_corpus(builder: PromptBuilder, data: Interactions) -> list[str]:
    """Text the tiny tokenizer learns from: catalogue text and rendered sample prompts."""
    corpus = [t for t in data.catalog.texts if t] + [t for t in data.catalog.titles if t]
    for u, seq in list(zip(data.users, data.sequences, strict=True))[:200]:
        corpus.extend(m["content"] for m in builder.messages(seq[:-2], u))
    corpus.extend(["system", "user", "assistant"])
    return corpus


def prepare_model(
    run: RunDir, cfg: RunConfig, builder: PromptBuilder, data: Interactions, *, resume: bool = False
) -> tuple[Any, Any]:
    """Build (tiny) or load (pretrained) the base with ID tokens; tiny bases are saved to base/.

    `resume`: a tiny base already in base/ is loaded as it is (the checkpoints were made from it). Otherwise
    it is built again from the config (deterministic: the same settings give the same base), so a changed
    model.* setting or tokenizer takes effect instead of an earlier run's base being reused silently."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    id_tokens = builder.ids.vocabulary()
    if cfg.model.base != "tiny":
        model, tokenizer, new_tokens = load_pretrained(cfg.model, id_tokens)
        init_ids_from_items(
            run, cfg, builder.ids, model, tokenizer, only=set(new_tokens), titles=data.catalog.titles
        )
        return model, tokenizer
    if resume and (run.base_dir / "config.json").is_file():  # the same tokenizer and initial weights
        return AutoModelForCausalLM.from_pretrained(run.base_dir), AutoTokenizer.from_pretrained(run.base_dir)
    tokenizer = train_tokenizer(tokenizer_corpus(builder, data), vocab_size=cfg.model.vocab_size)
    add_id_tokens(tokenizer, id_tokens)
    model = build_tiny(cfg.model, tokenizer)
    init_ids_from_items(run, cfg, builder.ids, model, tokenizer, titles=data.catalog.titles)
    model.save_pretrained(run.base_dir)
    tokenizer.save_pretrained(run.base_dir)
    # Reload so the model's name_or_path is base/: what a LoRA adapter records as its base.
    return AutoModelForCausalLM.from_pretrained(run.base_dir.resolve()), tokenizer


def init_ids_from_items(
    run: RunDir,
    cfg: RunConfig,
    ids: ItemIds,
    model: Any,
    tokenizer: Any,
    *,
    only: set[str] | None = None,
    titles: list[str] | None = None,
) -> None:
    """model.id_init=items: start the ID-token rows from the run's item embeddings; model.id_init=text: from
    the base's own input embeddings of the item titles (`titles`, catalogue order; see text_token_vectors).

    `only`: a pretrained base's new tokens (rows it already had, e.g. from an earlier genrec run, are
    kept); None: a tiny base built just now.
    """
    if cfg.model.id_init == "default":
        return
    vectors = id_init_vectors(run, cfg, ids, model, tokenizer, titles=titles)
    if only is not None:
        vectors = {t: v for t, v in vectors.items() if t in only}
    if not vectors:
        logger.info("ID tokens: the base already has all of them; their rows are kept")
        return
    if cfg.model.id_init == "text":
        n = set_id_rows(model, tokenizer, vectors)
    else:
        n = init_id_embeddings(
            model, tokenizer, vectors, scale=cfg.model.id_init_scale, pretrained=only is not None
        )
    logger.info(
        "ID tokens: %d of %d rows start from the item %s",
        n,
        len(ids.vocabulary()),
        "titles" if cfg.model.id_init == "text" else "embeddings",
    )


def id_init_vectors(
    run: RunDir, cfg: RunConfig, ids: ItemIds, model: Any, tokenizer: Any, *, titles: list[str] | None
) -> dict[str, np.ndarray]:
    """What model.id_init (`text` or `items`) starts each ID token's row from, before any rescaling."""
    if cfg.model.id_init == "text":
        if titles is None:
            raise GenrecError("model.id_init=text needs the catalogue's titles")
        return text_token_vectors(ids, titles, model, tokenizer)
    item_vectors = np.load(run.require(run.embeddings_file, "run `genrec build-ids --run DIR` first"))
    return id_token_vectors(ids, item_vectors, model.get_input_embeddings().weight.shape[1])


COLD_RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
"""Ridge penalties tried for place_cold_rows, as multiples of the mean eigenvalue of the warm vectors' Gram matrix."""


def place_cold_rows(
    run: RunDir,
    cfg: RunConfig,
    model: Any,
    tokenizer: Any,
    *,
    ids: ItemIds | None = None,
    titles: list[str] | None = None,
) -> dict[str, Any] | None:
    """Rows for the held-out items' atomic ID tokens (data.cold_items) where training would have put them.

    Training moves every warm item's row away from where model.id_init started it; a held-out item's row never
    trains, so it stays at its start, among rows the trained model no longer scores alike, and is never ranked
    (measured: 0 of 81 held-out test items in the top 10 on ml-100k). This fits a linear map from the start
    vectors to the trained rows on the warm items (ridge regression with an intercept, its penalty chosen on a
    seeded tenth of the warm items held out of the fit, by the mean cosine of predicted and trained rows) and
    places each held-out item's row at the map of its own start vector: its text, read the way training has
    taught the model to read the other items'. Untied output rows get their own map. Semantic IDs need none of
    this (a held-out item's codes are trained tokens). `ids` and `titles` (catalogue order): the run's, read
    from it where not given. Returns what it did, also recorded in run.json as `cold_rows` (None: nothing to do)."""
    m = cfg.model
    if m.cold_rows != "mapped" or m.id_init == "default" or cfg.data.cold_items <= 0:  # no I/O by default
        return None
    cold = run.cold_items(cfg)
    ids = ids if ids is not None else run.load_ids()
    if not cold or ids.scheme != "atomic":
        return None
    if titles is None and m.id_init == "text":
        titles = run.load_data().catalog.titles
    vectors = id_init_vectors(run, cfg, ids, model, tokenizer, titles=titles)
    cold_tokens = {ids.token(0, int(ids.codes[i, 0])) for i in cold}
    warm = sorted(t for t in vectors if t not in cold_tokens)
    held = sorted(t for t in vectors if t in cold_tokens)
    if not held or len(warm) < 20:
        return None
    x_warm = np.stack([vectors[t] for t in warm]).astype(np.float64)
    x_cold = np.stack([vectors[t] for t in held]).astype(np.float64)
    warm_ids, cold_ids = tokenizer.convert_tokens_to_ids(warm), tokenizer.convert_tokens_to_ids(held)
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tables = [emb] + ([out.weight] if out is not None and out.weight.data_ptr() != emb.data_ptr() else [])
    record: dict[str, Any] = {"items": len(held), "fitted_on": len(warm)}
    for name, table in zip(("input", "output"), tables, strict=False):
        y_warm = table.detach()[warm_ids].double().cpu().numpy()
        penalty, cosine = _choose_ridge(x_warm, y_warm, seed=cfg.train.seed)
        rows = _ridge_fit(x_warm, y_warm, penalty)(x_cold)
        with torch.no_grad():
            table[cold_ids] = torch.from_numpy(rows).to(table.dtype).to(table.device)
        record[name] = {"penalty": penalty, "held_out_cosine": round(cosine, 4)}
    logger.info(
        "held-out items: %d atomic ID rows placed by a map from their start vectors fitted on %d warm items "
        "(held-out-warm cosine %.3f)",
        len(held),
        len(warm),
        record["input"]["held_out_cosine"],
    )
    run.update_meta(cold_rows=record)
    return record


def _ridge_fit(x: np.ndarray, y: np.ndarray, penalty: float) -> Any:
    """Ridge regression y ~ x with an intercept; `penalty` relative to the mean eigenvalue of x's Gram matrix.
    Returns the fitted map."""
    mx, my = x.mean(0), y.mean(0)
    xc = x - mx
    gram = xc.T @ xc
    lam = penalty * max(float(np.trace(gram)) / gram.shape[0], 1e-12)
    w = np.linalg.solve(gram + lam * np.eye(gram.shape[0]), xc.T @ (y - my))
    return lambda z: (z - mx) @ w + my


def _choose_ridge(x: np.ndarray, y: np.ndarray, *, seed: int) -> tuple[float, float]:
    """The penalty of COLD_RIDGE_GRID whose map, fitted on nine tenths of the warm items, best predicts the other
    tenth's rows (mean cosine); returns it and that cosine."""
    order = np.random.default_rng(seed).permutation(len(x))
    test, fit = order[: max(len(x) // 10, 1)], order[max(len(x) // 10, 1) :]

    def cosine(a: np.ndarray, b: np.ndarray) -> float:
        num = (a * b).sum(1)
        return float((num / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)).mean())

    scored = [(cosine(_ridge_fit(x[fit], y[fit], p)(x[test]), y[test]), p) for p in COLD_RIDGE_GRID]
    best_cos, best_p = max(scored)
    return best_p, best_cos


def use_lora(cfg: RunConfig) -> bool:
    return cfg.train.method == "lora" or (cfg.train.method == "auto" and cfg.model.base != "tiny")


def lora_config(cfg: RunConfig, *, model: Any, tokenizer: Any, id_tokens: list[str]) -> Any:
    """LoRA adapters on train.lora_targets (r, alpha, dropout from the recipe); beside them only the ID tokens'
    embedding rows train (and their output rows: tied ones are the same rows, untied heads get their own).

    PEFT's `trainable_token_indices` trains those rows alone. TRL's fused LM-head loss cannot read the wrapped
    head (it asks for `lm_head.bias`); genrec's labelled_positions_head, which replaces it on the CPU and under a
    restricted model.id_softmax on every device, reads it through `weight` and trains. So only model.id_softmax=full
    on a GPU, where TRL's head runs, falls back to `modules_to_save` (the whole embedding and head matrices
    trained and saved: for SmolLM2, 28M parameters instead of a few hundred thousand).
    """
    from peft import LoraConfig

    token_ids = sorted(set(tokenizer.convert_tokens_to_ids(id_tokens)))
    tied = model.get_output_embeddings() is not None and (
        model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    )
    rows: dict[str, Any] = {}
    if cfg.model.id_softmax == "full" and torch.cuda.is_available():
        rows["modules_to_save"] = ["embed_tokens", "lm_head"]  # TRL refuses LoRA on lm_head
        logger.info("LoRA: embedding and LM head trained in full (model.id_softmax=full runs TRL's LM head)")
    else:
        rows["trainable_token_indices"] = {
            "embed_tokens": token_ids,
            **({} if tied else {"lm_head": token_ids}),
        }
        logger.info(
            "LoRA: %d ID-token rows trainable (%s)", len(token_ids), "tied head" if tied else "and head"
        )
    return LoraConfig(
        r=cfg.train.lora_r,
        lora_alpha=cfg.train.lora_alpha,
        lora_dropout=cfg.train.lora_dropout,
        target_modules=cfg.train.lora_targets,
        ensure_weight_tying=tied,  # a tied model stays tied (PEFT warns when asked on an untied one)
        task_type="CAUSAL_LM",
        **rows,
    )


def sft_config(run: RunDir, cfg: RunConfig) -> Any:
    from trl import SFTConfig

    t = cfg.train
    cuda = torch.cuda.is_available()
    bf16 = t.bf16 if t.bf16 is not None else bool(cuda and torch.cuda.is_bf16_supported())
    early: dict[str, Any] = {}
    if t.early_stopping_patience is not None:  # validate at every checkpoint; keep the best one's weights
        early = {
            "eval_strategy": "steps",
            "eval_steps": t.save_steps,
            "load_best_model_at_end": True,
            "metric_for_best_model": f"eval_{t.select_metric}",
            "greater_is_better": t.select_metric != "loss",
        }
    return SFTConfig(
        output_dir=str(run.checkpoints_dir),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        logging_steps=t.logging_steps,
        save_steps=t.save_steps,
        save_total_limit=2,
        save_only_model=False,
        report_to="none",
        seed=t.seed,
        bf16=bf16,
        gradient_checkpointing=(
            t.gradient_checkpointing if t.gradient_checkpointing is not None else cfg.model.base != "tiny"
        ),
        use_cpu=not cuda,
        max_length=t.max_length,
        completion_only_loss=True,
        dataset_num_proc=t.dataset_workers,
        dataloader_num_workers=0,
        disable_tqdm=False,
        **early,
    )


def labelled_positions_head(model: Any, softmax: IdSoftmax | None = None) -> None:
    """Make TRL's fused LM head score only the labelled positions on the CPU, with one matmul.

    SFTTrainer patches the model so that `model(..., fused_lm_head=True)` returns per-token
    log-probabilities without materialising all logits. Where Triton is missing (the CPU), that head
    projects every position of the batch, in chunks, through the whole vocabulary. genrec's rows train
    a few ID tokens each, so with a vocabulary of 13k ID tokens a step took 10x longer than projecting
    the labelled positions alone (BENCHMARKS.md, "Training only where the labels are"). This wraps the
    patched forward: on the CPU it runs the backbone, gathers the labelled positions and returns the same
    fields (loss, log_probs, entropy, is_top1, label_mask) computed from their logits; elsewhere, and for
    every other call, TRL's forward runs unchanged. Call it after SFTTrainer is built.

    `softmax` (model.id_softmax ids or level): every labelled position (all of them ID tokens) is scored
    against its group's rows alone, on every device, since TRL's head normalises over the whole vocabulary.
    """
    from trl.trainer.utils import FusedCausalLMOutput

    fused_forward = model.forward

    @functools.wraps(type(model).forward)  # as TRL does: the Trainer and `generate` read its signature
    def forward(
        self: Any,
        *args: Any,
        fused_lm_head: bool = False,
        labels: Any = None,
        shift_labels: Any = None,
        num_items_in_batch: Any = None,
        **kwargs: Any,
    ) -> Any:
        head = self.get_output_embeddings()
        if (
            not fused_lm_head
            or shift_labels is not None
            or labels is None
            or (head.weight.device.type != "cpu" and softmax is None)
        ):
            extra = {"shift_labels": shift_labels} if shift_labels is not None else {}
            return fused_forward(
                *args,
                fused_lm_head=fused_lm_head,
                labels=labels,
                num_items_in_batch=num_items_in_batch,
                **extra,
                **kwargs,
            )
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        target = labels[:, 1:]
        mask = target != -100
        picked = target[mask]
        if softmax is not None:
            token, entropy, top1 = softmax.label_fields(hidden[mask], head, picked)
        else:
            logits = head(hidden[mask]).float()
            logp = logits.log_softmax(-1)
            token = logp.gather(1, picked[:, None]).squeeze(1)
            with torch.no_grad():
                entropy = -(logp.exp() * logp).sum(-1)
                top1 = (logits.argmax(-1) == picked).to(token.dtype)
        # masked_scatter keeps the result attached to the graph when no position is labelled (a zero loss)
        log_probs = token.new_zeros(mask.shape).masked_scatter(mask, token)
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(
            loss=-log_probs.sum() / count,
            log_probs=log_probs,
            entropy=entropy.new_zeros(mask.shape).masked_scatter(mask, entropy),
            is_top1=top1.new_zeros(mask.shape).masked_scatter(mask, top1),
            label_mask=mask,
        )

    model.forward = types.MethodType(forward, model)


def loss_log_callback(path: Any) -> Any:
    """A TrainerCallback appending every logged loss to train_log.jsonl (kept across resumes)."""
    from transformers import TrainerCallback

    class LossLog(TrainerCallback):
        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
        ) -> None:
            if logs and state.is_world_process_zero:
                with open(path, "a") as f:
                    f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")

    return LossLog()


def ranking_callback(
    run: RunDir,
    cfg: RunConfig,
    data: Interactions,
    ids: ItemIds,
    valid: list[Example],
    held_out: Sequence[int] = (),
) -> Any:
    """A TrainerCallback that ranks the validation users with the model being trained at every evaluation
    and adds `eval_<train.select_metric>` to the metrics, before early stopping and checkpoint selection
    read them. Ranking is `genrec evaluate`'s (eval.candidates): the catalogue minus seen items, or the candidates
    the LM will be given, those of retrieval.source, from the run's retriever as fitted without the validation
    targets (`validation_retrieval`), by the LM's score alone (the fusion weight is chosen after training)."""
    from transformers import TrainerCallback

    from genrec.evaluation.metrics import user_metrics
    from genrec.prep import model_lists
    from genrec.retrieval import Retriever

    metric = cfg.train.select_metric
    k = int(metric.split("@")[1]) if "@" in metric else cfg.eval.beam_width
    ranking = dataclasses.replace(
        cfg, eval=dataclasses.replace(cfg.eval, beam_width=max(k, cfg.eval.beam_width))
    )
    retriever = Retriever(run.load_embeddings())
    collab = validation_retrieval(run, cfg, retriever) if cfg.eval.candidates == "retriever" else None

    class ValidationRanking(TrainerCallback):
        model: Any = None
        rec: Any = None
        """Built at the first evaluation and kept: the catalogue trie, user index and the trie layouts
        cached for it are the same at every evaluation; only the model's weights change."""

        def on_evaluate(
            self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None, **kw: Any
        ) -> None:
            model, tokenizer = kw["model"], kw["processing_class"]
            was_training = model.training
            if self.rec is None or self.model is not model:
                self.rec = in_memory_recommender(
                    run,
                    ranking,
                    data,
                    ids,
                    model,
                    tokenizer,
                    retriever=retriever,
                    collab=collab,
                    held_out=held_out,
                )
                self.model = model
            rec = self.rec
            model.eval()  # dropout off while ranking; restored below
            with torch.no_grad():
                lists = model_lists(rec, valid, ranking, progress=state.is_world_process_zero)
            model.train(was_training)
            value = float(
                np.mean([user_metrics(r, ex.target, [k])[metric] for r, ex in zip(lists, valid, strict=True)])
            )
            if metrics is not None:
                metrics[f"eval_{metric}"] = value
            logger.info(
                "step %d: validation %s %.4f (%d users)", state.global_step, metric, value, len(valid)
            )
            if state.is_world_process_zero:
                with open(run.train_log_file, "a") as f:
                    f.write(
                        json.dumps({"step": state.global_step, "epoch": state.epoch, f"eval_{metric}": value})
                        + "\n"
                    )

    return ValidationRanking()


def validation_retrieval(run: RunDir, cfg: RunConfig, text: Any) -> Any:
    """The collaborative retriever (retrieval.source; None for `text`) that ranking the validation users during
    training proposes candidates with: the run's, trained by `genrec train` before the LM, with the Markov chain
    and item-kNN fitted without the validation targets (retriever/valid/; SASRec's test model never saw them), so
    the checkpoint is chosen over the candidates the LM is finally given, without their answers leaking in."""
    from genrec.recommender import load_retrieval
    from genrec.retrieval import VALIDATION_DIR, for_validation

    collab, _ = load_retrieval(run, cfg, text=text)
    return None if collab is None else for_validation(collab, run.retriever_dir / VALIDATION_DIR)


def in_memory_recommender(
    run: RunDir,
    cfg: RunConfig,
    data: Interactions,
    ids: ItemIds,
    model: Any,
    tokenizer: Any,
    *,
    retriever: Any,
    collab: Any = None,
    fusion_weight: float | None = 0.0,
    held_out: Sequence[int] = (),
) -> Any:
    """A Recommender over a model in memory (what ranking_callback and the RL stage rank with): the run's search
    and model.id_softmax, no CUDA graphs (the weights change). `held_out` (data.cold_items): items it never ranks,
    their tokens outside the softmax, as training scores them (`training_softmax`)."""
    from genrec.engines.hf import HFEngine
    from genrec.recommender import Recommender

    engine = HFEngine(
        model,
        tokenizer,
        search=cfg.eval.search,
        max_tree_tokens=cfg.eval.max_tree_tokens,
        softmax_groups=training_softmax_groups(cfg, ids, held_out),
    )
    return Recommender(
        run, cfg, data, ids, engine, retriever, collab=collab, fusion_weight=fusion_weight, held_out=held_out
    )


def training_softmax_groups(cfg: RunConfig, ids: ItemIds, held_out: Sequence[int]) -> list[list[str]] | None:
    """The ID-token groups training normalises over (model.id_softmax): the tokens only held-out items use
    (data.cold_items) are left out, so that the items absent from training are not pushed down as a wrong answer
    at every step. At evaluation and serving they rejoin their groups. Under `full` (the vocabulary softmax,
    which TRL's head computes) they stay in it."""
    return softmax_groups(ids.level_tokens(), cfg.model.id_softmax, leave_out=ids.tokens_only_of(held_out))


def training_softmax(
    cfg: RunConfig, ids: ItemIds, held_out: Sequence[int], tokenizer: Any
) -> IdSoftmax | None:
    """The IdSoftmax training's loss uses (SFT and the RL stage): `training_softmax_groups`, with the held-out
    items' tokens also masked out of the vocabulary softmax of text labels."""
    gone = ids.tokens_only_of(held_out)
    groups = softmax_groups(ids.level_tokens(), cfg.model.id_softmax, leave_out=gone)
    return group_softmax(groups, tokenizer, masked=gone)


def time_budget_callback(minutes: float) -> Any:
    """A TrainerCallback that ends training (model still saved) after `minutes` of training wall clock."""
    from transformers import TrainerCallback

    class TimeBudget(TrainerCallback):
        def __init__(self) -> None:
            self.deadline = float("inf")
            self.hit = False

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.deadline = time.time() + 60 * minutes  # training time only, not data preparation

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if time.time() >= self.deadline:  # a checkpoint too, so that `train --resume` goes on from here
                self.hit = control.should_training_stop = control.should_save = True

    return TimeBudget()


def early_stopping_summary(stopper: Any, state: Any, metric: str = "loss") -> dict[str, Any]:
    """What early stopping did: the kept checkpoint's step and validation `metric`, and whether it ended training."""
    if stopper is None:
        return {}
    best = state.best_model_checkpoint
    return {
        "best_step": int(best.rsplit("-", 1)[-1]) if best else None,
        f"best_eval_{metric}": state.best_metric,
        # Patience can run out on the very last step; that is not stopping early.
        "stopped_early": bool(
            stopper.early_stopping_patience_counter >= stopper.early_stopping_patience
            and state.global_step < state.max_steps
        ),
    }


def _log_stopped(run: RunDir, step: int, save_steps: int, error: BaseException) -> None:
    """Say what a stopped training kept and how to go on: the checkpoint `train --resume` would take."""
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(run.checkpoints_dir)) if run.checkpoints_dir.is_dir() else None
    if last:
        logger.warning(
            "training %s at step %d; the last checkpoint is %s: `genrec train --run %s --resume` goes on from it",
            stopped_by(error),
            step,
            last,
            run.path,
        )
    else:
        logger.warning(
            "training %s at step %d, before its first checkpoint (every %d steps, train.save_steps): nothing to "
            "resume from",
            stopped_by(error),
            step,
            save_steps,
        )


def validation_users(data: Interactions, cfg: RunConfig, cold: Sequence[int] = ()) -> list[Example]:
    """The validation examples training judges by (checkpoint selection, the RL stage's keep rule): the first
    train.valid_users (0: all), none whose item is held out of training."""
    held_out = set(cold)
    valid = [ex for ex in leave_one_out(data, "valid") if ex.target not in held_out]
    return valid[: cfg.train.valid_users] if cfg.train.valid_users else valid


def train(run: RunDir, cfg: RunConfig, *, resume: bool = False) -> dict[str, Any]:
    """Train on every next-item position of the training sequences; write merged/ (and adapter/)."""
    from datasets import Dataset
    from trl import SFTTrainer

    cold = run.cold_items(cfg)
    data = without_items(run.load_data(), cold)  # held-out items (data.cold_items) are in no training row
    ids = run.load_ids()
    builder = prompt_builder(run, cfg, data, ids)
    t = cfg.train
    valid = validation_users(data, cfg, cold)
    check_input_tokens(builder, data)
    model, tokenizer = prepare_model(run, cfg, builder, data, resume=resume)
    softmax = training_softmax(cfg, ids, cold, tokenizer)
    if cold and softmax is None:
        logger.warning(
            "model.id_softmax=full: the %d held-out items' tokens stay in the vocabulary softmax, so training "
            "lowers their scores as wrong answers; ids or level leave them out",
            len(cold),
        )
    tasks = multitask(cfg)
    if t.history_loss or softmax is not None or tasks:  # tokenized rows, labelled here
        examples, augmented = training_examples(data, cfg)
        rows, too_long = history_loss_rows(
            builder, tokenizer, examples + augmented, max_length=t.max_length, history=t.history_loss
        )
        if too_long:
            logger.warning(
                "%d of %d rows are longer than train.max_length=%d tokens: left out",
                too_long,
                len(examples) + len(augmented),
                t.max_length,
            )
        if tasks:
            extra, mix = task_rows(run, cfg, data, ids, tokenizer, examples, cold=cold)
            rows += extra
            logger.info("multi-task rows: %s", mix)
            run.update_meta(multitask=mix)
        train_ds = Dataset.from_list(rows)
        valid_ds = Dataset.from_list(history_loss_rows(builder, tokenizer, valid, history=False)[0])
    else:
        examples, augmented = training_examples(data, cfg)
        train_ds = Dataset.from_list(sft_rows(builder, examples + augmented))
        valid_ds = Dataset.from_list(sft_rows(builder, valid))
    logger.info(
        "training %s: %d (validation users: %d)",
        "windows" if t.history_loss else "examples",
        len(examples),
        len(valid),
    )
    peft_cfg = (
        lora_config(cfg, model=model, tokenizer=tokenizer, id_tokens=ids.vocabulary())
        if use_lora(cfg)
        else None
    )
    if not resume and run.train_log_file.exists():
        run.train_log_file.unlink()
    callbacks = [loss_log_callback(run.train_log_file)]
    budget = time_budget_callback(cfg.train.max_minutes) if cfg.train.max_minutes else None
    if budget is not None:
        callbacks.append(budget)
    stopper = None
    if t.early_stopping_patience is not None:
        from transformers import EarlyStoppingCallback

        if t.select_metric != "loss":  # before the stopper: it reads the metric this adds
            callbacks.append(ranking_callback(run, cfg, data, ids, valid, cold))

        stopper = EarlyStoppingCallback(early_stopping_patience=t.early_stopping_patience)
        callbacks.append(stopper)
    trainer = SFTTrainer(
        model=model,
        args=sft_config(run, cfg),
        train_dataset=train_ds,
        eval_dataset=valid_ds,
        processing_class=tokenizer,
        peft_config=peft_cfg,
        callbacks=callbacks,
    )
    inner: Any = trainer.model
    labelled_positions_head(inner.get_base_model() if hasattr(inner, "get_base_model") else inner, softmax)
    has_ckpt = run.checkpoints_dir.is_dir() and any(run.checkpoints_dir.glob("checkpoint-*"))
    started = time.time()
    try:
        result = trainer.train(resume_from_checkpoint=bool(resume and has_ckpt))
    except BaseException as e:  # Ctrl-C (the CLI exits quietly on it), out of memory, a bad batch
        _log_stopped(run, trainer.state.global_step, t.save_steps, e)
        raise
    seconds = time.time() - started
    stopped = early_stopping_summary(
        stopper, trainer.state, t.select_metric
    )  # before evaluate(): it would count once more
    metrics = trainer.evaluate()
    logger.info("validation loss %.4f", metrics.get("eval_loss", float("nan")))
    if budget is not None and budget.hit:
        logger.warning(
            "train.max_minutes=%s reached: stopped at epoch %.2f of %s",
            cfg.train.max_minutes,
            trainer.state.epoch or 0.0,
            cfg.train.epochs,
        )
    if run.merged_sft_dir.exists():  # an earlier RL stage's SFT model: merged/ is about to hold this one
        shutil.rmtree(run.merged_sft_dir)
    run.drop_meta("rl")  # an earlier RL stage's record describes a model this one replaces
    if peft_cfg is not None:
        trained: Any = trainer.model
        trained.save_pretrained(run.adapter_dir)
        tokenizer.save_pretrained(run.adapter_dir)
        merge(run, model=trained, tokenizer=tokenizer, cfg=cfg)
    else:
        final: Any = trainer.model
        place_cold_rows(run, cfg, final, tokenizer, ids=ids, titles=data.catalog.titles)
        final.save_pretrained(run.merged_dir)
        tokenizer.save_pretrained(run.merged_dir)
    summary = {
        "train_loss": result.training_loss,
        "eval_loss": metrics.get("eval_loss"),
        **(
            {f"eval_{t.select_metric}": metrics.get(f"eval_{t.select_metric}")}
            if t.select_metric != "loss"
            else {}
        ),
        "steps": result.global_step,
        "epochs": round(float(trainer.state.epoch or 0.0), 2),
        "stopped_by_time_budget": bool(budget is not None and budget.hit),
        **stopped,
        "examples": len(examples),
        **({"augment": list(t.augment), "augmented_rows": len(augmented)} if t.augment else {}),
        "history_loss": t.history_loss,
        "id_softmax": cfg.model.id_softmax,  # what every engine must score with (RunDir.trained_id_softmax)
        "seconds": round(seconds, 1),
        "method": "lora" if peft_cfg is not None else "full",
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    run.drop_model_choices()  # weights chosen for an earlier model
    run.update_meta(
        train=summary,
        template={
            "name": builder.template.name,
            "hash": builder.template.hash,
            "source": builder.template.source,
        },
    )
    return summary


def training_examples(data: Interactions, cfg: RunConfig) -> tuple[list[Example], list[Example]]:
    """The next-item examples of the training parts, and their augmented copies (train.augment; [] when off).

    train.history_loss: one example per window of prompt.max_history + 1 items (the loss on every shown ID);
    else one per target. `data` is what training may see (held-out items already removed), so augmented rows,
    which only select and reorder an example's items, never hold a validation, test or held-out item."""
    t = cfg.train
    examples = (
        history_windows(data, window=cfg.prompt.max_history, per_user=t.examples_per_user)
        if t.history_loss
        else train_examples(data, per_user=t.examples_per_user)
    )
    augmented = augment_examples(
        examples, list(t.augment), ratio=t.augment_ratio, copies=t.augment_copies, seed=t.seed
    )
    if augmented:
        logger.info(
            "augmentation %s (ratio %g): %d rows added to %d",
            "+".join(t.augment),
            t.augment_ratio,
            len(augmented),
            len(examples),
        )
    return examples, augmented


def multitask(cfg: RunConfig) -> bool:
    """Whether the recipe mixes in any of the text tasks (train.need_rows, item_text_rows, title_rows)."""
    t = cfg.train
    return bool(t.need_rows or t.item_text_rows or t.title_rows)


def task_rows(
    run: RunDir,
    cfg: RunConfig,
    data: Interactions,
    ids: ItemIds,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    cold: Sequence[int] = (),
) -> tuple[list[dict[str, list[int]]], dict[str, int]]:
    """The multi-task rows of the recipe's mix (genrec.task_rows), tokenized, and how many of each task.
    Need rows are drawn from the next-item examples; the single-item tasks from the trained items (the
    held-out ones never appear)."""
    t, p = cfg.train, cfg.prompt
    rows: list[dict[str, list[int]]] = []
    mix: dict[str, int] = {}
    too_long = 0
    if t.need_rows:
        chosen = need_examples(examples, t.need_rows, seed=t.seed)
        need_builder = prompt_builder(run, cfg, data, ids, template=p.need_template)
        queries = needs_of(need_builder, chosen, seed=t.seed, title_words=p.need_title_words)
        made, n = history_loss_rows(
            need_builder, tokenizer, chosen, max_length=t.max_length, history=False, queries=queries
        )
        rows += made
        mix["need"], too_long = len(made), too_long + n
    for ratio, template, task in (
        (t.item_text_rows, p.item_text_template, "item_id"),
        (t.title_rows, p.item_title_template, "id_title"),
    ):
        if ratio:
            items = item_rows_items(len(data.catalog), ratio, exclude=cold, seed=t.seed)
            made, n = single_item_rows(
                prompt_builder(run, cfg, data, ids, template=template),
                tokenizer,
                items,
                task=task,
                max_length=t.max_length,
            )
            rows += made
            mix[task], too_long = len(made), too_long + n
    if too_long:
        logger.warning(
            "%d multi-task rows are longer than train.max_length=%d tokens: left out", too_long, t.max_length
        )
    return rows, mix


def merge(run: RunDir, *, model: Any = None, tokenizer: Any = None, cfg: RunConfig | None = None) -> str:
    """Merge the LoRA adapter into its base and save model + tokenizer to merged/ (held-out items' rows placed:
    place_cold_rows, by `cfg` or the run's config)."""
    if model is None:
        from peft import AutoPeftModelForCausalLM
        from transformers import AutoTokenizer

        if (run.meta().get("rl") or {}).get("kept"):
            raise GenrecError(
                f"{run.merged_dir} holds the RL model (run.json: rl.kept); adapter/ is the SFT adapter, and merging "
                f"it would replace the RL model with the SFT one (which is in {run.merged_sft_dir}). To serve SFT, "
                "copy that folder over merged/; to redo RL, run `genrec rl`"
            )
        adapter = run.require(run.adapter_dir, "train with train.method=lora first")
        model = AutoPeftModelForCausalLM.from_pretrained(adapter)
        tokenizer = AutoTokenizer.from_pretrained(adapter)
    merged = model.merge_and_unload()
    place_cold_rows(run, cfg or run.load_config(), merged, tokenizer)
    merged.save_pretrained(run.merged_dir)
    tokenizer.save_pretrained(run.merged_dir)
    logger.info("merged model written to %s", run.merged_dir)
    return str(run.merged_dir)
