"""What an item-ID token's log-probability is normalised over: the whole vocabulary, or its level's tokens.

`model.id_softmax=full` (the default) scores an ID token as a language model scores any token: the
softmax runs over the whole vocabulary (base text tokens, every ID level, input tokens). With `level`,
the model only ever writes ID tokens, one level at a time, so the softmax at a position that writes
level l runs over level l's tokens alone: log P(item | prompt) is then the sum, level by level, of
log-softmaxes over that level's codes. Training and every engine must use the same rule (the run
records it); this module is the one place that computes it.

It costs a projection onto a level's rows instead of the whole vocabulary: on the CPU, 13k-row output
heads (ids.input_tokens on Beauty) shrink to 64 rows per level, and a pretrained base's 150k text
tokens leave the head entirely. Knows token ids and tensors, nothing of tries, prompts or engines.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

ID_SOFTMAX = ("full", "level")


@dataclass
class LevelEdges:
    """The edges of one level within a batch: which states are scored against the level's tokens, and
    where each edge's log-prob is read from that (states x level tokens) block."""

    level: int
    states: np.ndarray
    """Rows of the states tensor whose next token is of this level (each once)."""
    edges: np.ndarray
    """Indices of this level's edges in the batch's edge order."""
    at: np.ndarray
    """Each edge's state, as an index into `states`."""
    cols: np.ndarray
    """Each edge's token, as its column among the level's tokens."""


class LevelSoftmax:
    """Log-probs of ID tokens, each normalised over the tokens of its own level.

    `levels[l]`: the token ids of level l (for atomic IDs, one level holding every item). Every
    state scored here writes one level's token; edges are (state, token) pairs, several edges may share
    a state (a trie node's children), and all edges of one state are of one level.
    """

    def __init__(self, levels: Sequence[Sequence[int]], *, vocab_size: int) -> None:
        if not levels or any(len(t) == 0 for t in levels):
            raise ValueError("every ID level needs at least one token")
        self.levels = [np.asarray(t, dtype=np.int64) for t in levels]
        self.level_of = np.full(vocab_size, -1, dtype=np.int64)
        self.column = np.full(vocab_size, -1, dtype=np.int64)
        for lv, toks in enumerate(self.levels):
            if toks.min() < 0 or toks.max() >= vocab_size:
                raise ValueError(f"ID level {lv}: token ids fall outside the vocabulary of {vocab_size}")
            if (self.level_of[toks] >= 0).any() or len(np.unique(toks)) < len(toks):
                raise ValueError(f"ID level {lv}: token ids repeat across levels")
            self.level_of[toks] = lv
            self.column[toks] = np.arange(len(toks))
        self._rows: dict[tuple[torch.device, int], torch.Tensor | slice] = {}

    @classmethod
    def from_tokens(cls, level_tokens: Sequence[Sequence[str]], tokenizer: Any) -> LevelSoftmax:
        """From each level's token strings (ItemIds.level_tokens) and the tokenizer that holds them."""
        levels = [list(tokenizer.convert_tokens_to_ids(list(toks))) for toks in level_tokens]
        unk = getattr(tokenizer, "unk_token_id", None)
        if any(t is None or t == unk for toks in levels for t in toks):
            raise ValueError("the tokenizer lacks some item-ID tokens; was it trained on this run's IDs?")
        return cls(levels, vocab_size=len(tokenizer))

    def level_tokens(self, level: int) -> list[int]:
        return self.levels[level].tolist()

    def level_of_token(self, token: int) -> int:
        lv = int(self.level_of[token])
        if lv < 0:
            raise ValueError(f"token {token} is not an item-ID token")
        return lv

    def group(self, edge_state: np.ndarray, edge_token: np.ndarray) -> list[LevelEdges]:
        """Edges (state index, token id) grouped by level, on the CPU: what `edge_log_probs` takes."""
        edge_state = np.asarray(edge_state, dtype=np.int64)
        edge_token = np.asarray(edge_token, dtype=np.int64)
        level = self.level_of[edge_token]
        if len(level) and level.min() < 0:
            bad = int(edge_token[np.argmin(level)])
            raise ValueError(
                f"token {bad} is not an item-ID token: model.id_softmax=level scores ID tokens only"
            )
        out = []
        for lv in np.unique(level).tolist():
            edges = np.flatnonzero(level == lv)
            states, at = np.unique(edge_state[edges], return_inverse=True)
            out.append(LevelEdges(lv, states, edges, at.reshape(-1), self.column[edge_token[edges]]))
        return out

    def _weight(self, head: Any, level: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The head's rows (and bias) of a level's tokens: a view where the ids are contiguous."""
        weight = head.weight
        key = (weight.device, level)
        if key not in self._rows:
            toks = self.levels[level]
            contiguous = bool((np.diff(toks) == 1).all())
            self._rows[key] = (
                slice(int(toks[0]), int(toks[-1]) + 1)
                if contiguous
                else torch.from_numpy(toks).to(weight.device)
            )
        rows = self._rows[key]
        bias = getattr(head, "bias", None)
        return weight[rows], None if bias is None else bias[rows]

    def level_logits(self, states: torch.Tensor, head: Any, level: int) -> torch.Tensor:
        """(n, level size) float32 logits of `states` over one level's tokens."""
        weight, bias = self._weight(head, level)
        logits = torch.nn.functional.linear(states, weight, bias)
        return logits.float()

    def edge_log_probs(
        self, states: torch.Tensor, head: Any, groups: Sequence[LevelEdges], n_edges: int
    ) -> torch.Tensor:
        """(n_edges,) float32 log-probs: each edge's token logit minus its state's log-normaliser over the
        level. Index arrays go to `states`' device in one copy per level (no wait on a GPU)."""
        from genrec.decoding.tree import to_device

        out = torch.empty(n_edges, dtype=torch.float32, device=states.device)
        for g in groups:
            rows, edges, at, cols = to_device([g.states, g.edges, g.at, g.cols], states.device)
            logp = self.level_logits(states[rows], head, g.level).log_softmax(-1)
            out[edges] = logp[at, cols]
        return out

    def label_fields(
        self, states: torch.Tensor, head: Any, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training: for each state and its label token, (log-prob, entropy, whether the label is the level's
        argmax); the log-prob carries gradients, the other two do not."""
        n, device = len(labels), states.device
        entropy = torch.zeros(n, dtype=torch.float32, device=device)
        top1 = torch.zeros_like(entropy)
        # with no label at all, an empty result still attached to the graph (a zero loss that backpropagates)
        token_lp = entropy.clone() if n else states[:0, 0].float()
        for g in self.group(np.arange(n), labels.cpu().numpy()):
            at = torch.from_numpy(g.states).to(device)
            cols = torch.from_numpy(g.cols).to(device)
            logp = self.level_logits(states[at], head, g.level).log_softmax(-1)
            token_lp = token_lp.index_put((at,), logp.gather(1, cols[:, None]).squeeze(1))  # out of place
            with torch.no_grad():
                entropy[at] = -(logp.exp() * logp).sum(-1)
                top1[at] = (logp.argmax(-1) == cols).float()
        return token_lp, entropy, top1
