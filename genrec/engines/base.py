"""The engine interface: turn chat messages into prompt token ids and rank trie candidates.

Engines own a model and its tokenizer; the shared constrained beam search (genrec.decoding)
drives them through a StepModel. Front ends (CLI, batch, server) talk only to this interface.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from genrec.decoding import Ranked, Trie
from genrec.decoding.tree import TreeLayout


class Engine(Protocol):
    name: str
    tokenizer: Any
    concurrent: bool
    """True when rank() may run in several threads at once (the engine batches across them)."""
    ranked_by: Counter[str]
    """Requests ranked so far by each search: "exact" (tree scoring) or "beam"."""

    def encode_messages(self, messages: list[dict[str, str]]) -> list[int]:
        """Prompt token ids: the chat template with the assistant turn opened."""
        ...

    def encode_many(self, conversations: Sequence[list[dict[str, str]]]) -> list[list[int]]:
        """`encode_messages` for a batch, in one tokenizer call."""
        ...

    def rank(
        self,
        prompts: Sequence[Sequence[int]],
        tries: Sequence[Trie],
        *,
        beam_width: int,
        layouts: Sequence[TreeLayout | None] | None = None,
    ) -> list[Ranked]:
        """Up to beam_width distinct trie items per prompt, best first (constrained beam search, or exact
        tree scoring where the engine has it). `layouts`: the tries' tree layouts, made ahead by
        genrec.prep's workers for an engine with a `layout_policy`; None for the others. A request with a
        layout may come without its trie (None)."""
        ...

    def launch(
        self,
        prompts: Sequence[Sequence[int]],
        tries: Sequence[Trie | None],
        *,
        beam_width: int,
        layouts: Sequence[TreeLayout | None] | None = None,
    ) -> Callable[[], list[Ranked]]:
        """`rank` in two steps: start the work and return a call that gives its result. An engine that can
        leave work running on its device returns before it ends (the transformers engine's tree scoring), so
        a batch job prepares the next batch meanwhile; the others rank before returning. `RankByLaunch` gives
        an engine `rank` from its `launch`."""
        ...


class RankByLaunch:
    """`Engine.rank` for an engine that implements `Engine.launch`: start the work, then wait for its result."""

    launch: Callable[..., Callable[[], list[Ranked]]]

    def rank(
        self,
        prompts: Sequence[Sequence[int]],
        tries: Sequence[Trie | None],
        *,
        beam_width: int,
        layouts: Sequence[TreeLayout | None] | None = None,
    ) -> list[Ranked]:
        return self.launch(prompts, tries, beam_width=beam_width, layouts=layouts)()


def encode_chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of `messages` with the generation prompt, exactly as TRL tokenizes training prompts."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(out["input_ids"])


def encode_chats(tokenizer: Any, conversations: Sequence[list[dict[str, str]]]) -> list[list[int]]:
    """`encode_chat` of each conversation, the same ids, with one batched tokenizer call: about 0.6 of
    the cost per prompt of one call each on the 2-core CPU (BENCHMARKS.md, "Prompts in batches")."""
    if not conversations:
        return []
    out = tokenizer.apply_chat_template(
        list(conversations), add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return [list(ids) for ids in out["input_ids"]]


class ChatPrompts:
    """`Engine.encode_messages` and `encode_many` for an engine whose `tokenizer` holds the chat template."""

    tokenizer: Any

    def encode_messages(self, messages: list[dict[str, str]]) -> list[int]:
        return encode_chat(self.tokenizer, messages)

    def encode_many(self, conversations: Sequence[list[dict[str, str]]]) -> list[list[int]]:
        return encode_chats(self.tokenizer, conversations)


def tries_at(tries: Sequence[Trie | None], at: Iterable[int]) -> list[Trie]:
    """The tries at positions `at`; each must be there (only a request with a tree layout may come without)."""
    out = []
    for i in at:
        t = tries[i]
        if t is None:
            raise ValueError(f"request {i} has neither a trie nor a tree layout")
        out.append(t)
    return out
