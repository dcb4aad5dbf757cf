"""Multi-task training rows that tie item text to item IDs (as LC-Rec does), beside history -> next item.

Three tasks, each rendered by its own template (prompt.need_template, prompt.item_text_template,
prompt.item_title_template) and mixed in by the recipe (train.need_rows, train.item_text_rows,
train.title_rows):

- need + history -> item: the target's derived need (genrec.data.needs) given with the history; the loss
  on the answer's ID;
- item text -> ID: the loss on the ID;
- ID -> title: the loss on the title's tokens and the end of the turn, so the model can say what an ID
  stands for (scored over the whole vocabulary whatever model.id_softmax says: titles are text).

Rows are tokenized here, with labels, in the format TRL trains on as it is. Knows prompts, tokenizers
and examples; nothing of trainers or engines.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from genrec.data import Example
from genrec.data.needs import derive_need
from genrec.errors import GenrecError
from genrec.templates.prompts import PromptBuilder

logger = logging.getLogger(__name__)

IGNORE = -100


def picked(n: int, ratio: float, rng: np.random.Generator) -> list[int]:
    """round(ratio * n) indices in 0..n-1: each index once per whole multiple of n (ratio 2.0: twice), the
    fractional rest drawn without replacement; sorted."""
    want = round(ratio * n)
    if n == 0 or want <= 0:
        return []
    whole, rest = divmod(want, n)
    out = [i for _ in range(whole) for i in range(n)]
    out.extend(rng.choice(n, size=rest, replace=False).tolist())
    return sorted(out)


def need_examples(examples: Sequence[Example], ratio: float, *, seed: int) -> list[Example]:
    """The examples that get a need row: train.need_rows per history row."""
    rng = np.random.default_rng([seed, 0x4EED])
    return [examples[i] for i in picked(len(examples), ratio, rng)]


def needs_of(
    builder: PromptBuilder, examples: Sequence[Example], *, seed: int, title_words: int
) -> list[str]:
    """Each example's need, derived from its target (genrec.data.needs: never the target's title)."""
    return [
        derive_need(builder.catalog, ex.target, user=ex.user, seed=seed, title_words=title_words)
        for ex in examples
    ]


def item_rows_items(n_items: int, ratio: float, *, exclude: Sequence[int] = (), seed: int) -> list[int]:
    """Catalogue rows for the single-item tasks: `ratio` rows per trained item (held-out items excluded)."""
    banned = set(exclude)
    pool = [i for i in range(n_items) if i not in banned]
    rng = np.random.default_rng([seed, 0x17E4])
    return [pool[i] for i in picked(len(pool), ratio, rng)]


class RowMaker:
    """Tokenizes (prompt messages, completion text) pairs into input_ids + labels with the tokenizer's chat
    template: labels on the answer's ID tokens (`id_row`) or on the completion's text and the first token of
    the end of the turn (`text_row`)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._trailer: list[int] | None = None

    def _ids(self, messages: list[dict[str, str]], *, generation_prompt: bool = False) -> list[int]:
        out = self.tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, add_generation_prompt=generation_prompt
        )
        return list(out["input_ids"])

    def id_row(
        self, prompt: list[dict[str, str]], answer: str, answer_ids: list[int]
    ) -> dict[str, list[int]]:
        full = self._ids([*prompt, {"role": "assistant", "content": answer}])
        at = rfind(full, answer_ids)
        if at < 0:
            raise GenrecError(f"the tokenized row does not hold the answer's ID tokens {answer_ids}")
        labels = [IGNORE] * len(full)
        labels[at : at + len(answer_ids)] = answer_ids
        return {"input_ids": full, "labels": labels}

    def trailer(self, prompt: list[dict[str, str]]) -> list[int]:
        """The tokens the chat template puts after an assistant turn's content (e.g. `<|im_end|>` and a newline)."""
        if self._trailer is None:
            head = self._ids(prompt, generation_prompt=True)
            empty = self._ids([*prompt, {"role": "assistant", "content": ""}])
            self._trailer = empty[len(head) :] if empty[: len(head)] == head else []
        return self._trailer

    def text_row(self, prompt: list[dict[str, str]], completion: str) -> dict[str, list[int]]:
        head = self._ids(prompt, generation_prompt=True)
        full = self._ids([*prompt, {"role": "assistant", "content": completion}])
        if full[: len(head)] != head:
            raise GenrecError("the chat template renders the prompt differently with and without an answer")
        trailer = self.trailer(prompt)
        end = len(full) - len(trailer) if trailer and full[-len(trailer) :] == trailer else len(full)
        labels = [IGNORE] * len(full)
        stop = min(end + 1, len(full)) if trailer else end  # the answer, then the turn's end: when to stop
        labels[len(head) : stop] = full[len(head) : stop]
        return {"input_ids": full, "labels": labels}


def rfind(seq: list[int], sub: list[int]) -> int:
    """Last index where `sub` starts in `seq`, else -1."""
    for i in range(len(seq) - len(sub), -1, -1):
        if seq[i : i + len(sub)] == sub:
            return i
    return -1


def single_item_rows(
    builder: PromptBuilder,
    tokenizer: Any,
    items: Sequence[int],
    *,
    task: str,
    max_length: int | None = None,
) -> tuple[list[dict[str, list[int]]], int]:
    """item text -> ID (`task="item_id"`) or ID -> title (`task="id_title"`) rows for `items`; rows longer
    than `max_length` are left out. Returns (rows, how many were too long)."""
    maker = RowMaker(tokenizer)
    rows, too_long = [], 0
    for item in tqdm(items, desc=f"{task} rows", unit="row", leave=False, disable=len(items) < 10_000):
        prompt = builder.item_messages(item)
        if task == "item_id":
            answer = builder.target(item)
            row = maker.id_row(
                prompt, answer, list(tokenizer.convert_tokens_to_ids(builder.ids.item_tokens(item)))
            )
        elif task == "id_title":
            title = builder.catalog.titles[item] or builder.catalog.item_ids[item]
            row = maker.text_row(prompt, title)
        else:
            raise ValueError(f"unknown single-item task {task!r}")
        if max_length is not None and len(row["input_ids"]) > max_length:
            too_long += 1
            continue
        rows.append(row)
    return rows, too_long
