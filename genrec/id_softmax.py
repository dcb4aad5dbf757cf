"""What an item-ID token's log-probability is normalised over: the vocabulary, every ID token, or its level's.

`model.id_softmax=full` scores an ID token as a language model scores any token: the
softmax runs over the whole vocabulary (base text tokens, every ID level, input tokens). The model never
writes anything but ID tokens, so the softmax can run over fewer: `ids` (the default) normalises over every
ID token (all levels; no text or input tokens), `level` over the tokens of the position's own level. log P(item |
prompt) is then the sum, token by token, of log-softmaxes over that token's group. Training and every
engine must use the same rule (the run records it); this module is the one place that computes it.

A restricted softmax projects onto the group's rows instead of the whole vocabulary: 13k-row output
heads (ids.input_tokens on Beauty) shrink to a few hundred rows, and a pretrained base's 150k text tokens
leave the head entirely. Knows token ids and tensors, nothing of tries, prompts or engines.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from genrec.config import ID_SOFTMAX


def softmax_groups(
    level_tokens: Sequence[Sequence[str]], mode: str, *, leave_out: Collection[str] = ()
) -> list[list[str]] | None:
    """The groups of ID tokens that model.id_softmax=`mode` normalises over, from each level's tokens
    (ItemIds.level_tokens): None for `full` (the whole vocabulary), one group of every ID token for `ids`,
    each level on its own for `level`.

    `leave_out`: tokens in no group. Training passes the tokens of the items held out of it (data.cold_items;
    ItemIds.tokens_only_of): an item that does not exist yet is not a wrong answer to push down at every step."""
    if mode not in ID_SOFTMAX:
        raise ValueError(f"model.id_softmax must be one of {ID_SOFTMAX}, got {mode!r}")
    if mode == "full":
        return None
    gone = set(leave_out)
    if mode == "ids":
        return [[t for level in level_tokens for t in level if t not in gone]]
    return [[t for t in level if t not in gone] for level in level_tokens]


def group_softmax(
    groups: Sequence[Sequence[str]] | None, tokenizer: Any, *, masked: Collection[str] = ()
) -> IdSoftmax | None:
    """The IdSoftmax over `groups` (`softmax_groups`) in `tokenizer`'s ids; None for the vocabulary softmax.
    `masked`: tokens that text labels are not scored against either (IdSoftmax.masked)."""
    if groups is None:
        return None
    out = IdSoftmax.from_tokens(groups, tokenizer)
    out.masked = np.asarray(sorted(tokenizer.convert_tokens_to_ids(sorted(masked))), dtype=np.int64)
    return out


@dataclass
class GroupEdges:
    """The edges of one group within a batch: which states are scored against the group's tokens, and
    where each edge's log-prob is read from that (states x group tokens) block."""

    group: int
    states: np.ndarray
    """Rows of the states tensor whose next token is of this group (each once)."""
    edges: np.ndarray
    """Indices of this group's edges in the batch's edge order."""
    at: np.ndarray
    """Each edge's state, as an index into `states`."""
    cols: np.ndarray
    """Each edge's token, as its column among the group's tokens."""


class IdSoftmax:
    """Log-probs of ID tokens, each normalised over the tokens of its group (genrec.id_softmax).

    `groups[g]`: the token ids of group g (disjoint). Edges are (state, token) pairs: several edges may
    share a state (a trie node's children), and all edges of one state are of one group (a trie level's
    tokens are one level's, and every level lies in one group).
    """

    def __init__(self, groups: Sequence[Sequence[int]], *, vocab_size: int) -> None:
        if not groups or any(len(t) == 0 for t in groups):
            raise ValueError("every softmax group needs at least one token")
        self.groups = [np.asarray(t, dtype=np.int64) for t in groups]
        self.group_of = np.full(vocab_size, -1, dtype=np.int64)
        self.column = np.full(vocab_size, -1, dtype=np.int64)
        for g, toks in enumerate(self.groups):
            if toks.min() < 0 or toks.max() >= vocab_size:
                raise ValueError(f"softmax group {g}: token ids fall outside the vocabulary of {vocab_size}")
            if (self.group_of[toks] >= 0).any() or len(np.unique(toks)) < len(toks):
                raise ValueError(f"softmax group {g}: token ids repeat across groups")
            self.group_of[toks] = g
            self.column[toks] = np.arange(len(toks))
        self._rows: dict[tuple[torch.device, int], torch.Tensor | slice] = {}
        self._lists: list[list[int]] | None = None
        self.masked = np.zeros(0, dtype=np.int64)
        """Token ids left out of the vocabulary softmax of text labels (`label_fields`): the tokens of items held
        out of training, which are in no group either, so that no position's loss involves their rows."""

    @classmethod
    def from_tokens(cls, groups: Sequence[Sequence[str]], tokenizer: Any) -> IdSoftmax:
        """From each group's token strings (`softmax_groups`) and the tokenizer that holds them."""
        ids = [list(tokenizer.convert_tokens_to_ids(list(toks))) for toks in groups]
        unk = getattr(tokenizer, "unk_token_id", None)
        if any(t is None or t == unk for toks in ids for t in toks):
            raise ValueError("the tokenizer lacks some item-ID tokens; was it trained on this run's IDs?")
        return cls(ids, vocab_size=len(tokenizer))

    @property
    def widest(self) -> int:
        """Tokens in the largest group: the widest logits a state gets."""
        return max(len(t) for t in self.groups)

    def group_tokens(self, group: int) -> list[int]:
        """A group's token ids as a list (made once: the vLLM engine masks every request with one; do not
        modify it)."""
        if self._lists is None:
            self._lists = [g.tolist() for g in self.groups]
        return self._lists[group]

    def group_of_token(self, token: int) -> int:
        g = int(self.group_of[token])
        if g < 0:
            raise ValueError(f"token {token} is not an item-ID token")
        return g

    def by_group(self, edge_state: np.ndarray, edge_token: np.ndarray) -> list[GroupEdges]:
        """Edges (state index, token id) by group, on the CPU: what `edge_log_probs` takes."""
        edge_state = np.asarray(edge_state, dtype=np.int64)
        edge_token = np.asarray(edge_token, dtype=np.int64)
        group = self.group_of[edge_token]
        if len(group) and group.min() < 0:
            bad = int(edge_token[np.argmin(group)])
            raise ValueError(
                f"token {bad} is not an item-ID token: a restricted model.id_softmax scores ID tokens only"
            )
        out = []
        for g in np.unique(group).tolist():
            edges = np.flatnonzero(group == g)
            states, at = _unique_inverse(edge_state[edges])
            out.append(GroupEdges(g, states, edges, at, self.column[edge_token[edges]]))
        return out

    def _weight(self, head: Any, group: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The head's rows (and bias) of a group's tokens: a view where the ids are contiguous."""
        weight = head.weight
        key = (weight.device, group)
        if key not in self._rows:
            toks = self.groups[group]
            contiguous = bool((np.diff(toks) == 1).all())
            self._rows[key] = (
                slice(int(toks[0]), int(toks[-1]) + 1)
                if contiguous
                else torch.from_numpy(toks).to(weight.device)
            )
        rows = self._rows[key]
        bias = getattr(head, "bias", None)
        return weight[rows], None if bias is None else bias[rows]

    def group_logits(self, states: torch.Tensor, head: Any, group: int) -> torch.Tensor:
        """(n, group size) float32 logits of `states` over one group's tokens."""
        weight, bias = self._weight(head, group)
        return torch.nn.functional.linear(states, weight, bias).float()

    def edge_log_probs(
        self, states: torch.Tensor, head: Any, groups: Sequence[GroupEdges], n_edges: int
    ) -> torch.Tensor:
        """(n_edges,) float32 log-probs: each edge's token logit minus its state's log-normaliser over the
        group. Index arrays go to `states`' device in one copy per group (no wait on a GPU)."""
        from genrec.decoding.tree import to_device

        out = torch.empty(n_edges, dtype=torch.float32, device=states.device)
        for g in groups:
            rows, edges, at, cols = to_device([g.states, g.edges, g.at, g.cols], states.device)
            logp = self.group_logits(states[rows], head, g.group).log_softmax(-1)
            out[edges] = logp[at, cols]
        return out

    def label_fields(
        self, states: torch.Tensor, head: Any, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training: for each state and its label token, (log-prob, entropy, whether the label is the group's
        argmax); the log-prob carries gradients, the other two do not. A label that is not an ID token (the
        text of an ID -> title row, genrec.task_rows) is scored over the whole vocabulary, as text is."""
        n, device = len(labels), states.device
        entropy = torch.zeros(n, dtype=torch.float32, device=device)
        top1 = torch.zeros_like(entropy)
        # with no label at all, an empty result still attached to the graph (a zero loss that backpropagates)
        token_lp = entropy.clone() if n else states[:0, 0].float()
        label_ids = labels.cpu().numpy()
        is_id = self.group_of[label_ids] >= 0
        if not is_id.all():
            at = torch.from_numpy(np.flatnonzero(~is_id)).to(device)
            logits = head(states[at]).float()
            if len(self.masked):
                logits = logits.index_fill(1, torch.from_numpy(self.masked).to(device), float("-inf"))
            logp = logits.log_softmax(-1)
            picked = labels[at]
            token_lp = token_lp.index_put((at,), logp.gather(1, picked[:, None]).squeeze(1))
            with torch.no_grad():
                entropy[at] = -torch.special.xlogy(logp.exp(), logp.exp()).sum(-1)  # 0 log 0 = 0 (masked)
                top1[at] = (logp.argmax(-1) == picked).float()
        ids_at = np.flatnonzero(is_id)
        for g in self.by_group(ids_at, label_ids[ids_at]):
            at = torch.from_numpy(g.states).to(device)
            cols = torch.from_numpy(g.cols).to(device)
            logp = self.group_logits(states[at], head, g.group).log_softmax(-1)
            token_lp = token_lp.index_put((at,), logp.gather(1, cols[:, None]).squeeze(1))  # out of place
            with torch.no_grad():
                entropy[at] = -(logp.exp() * logp).sum(-1)
                top1[at] = (logp.argmax(-1) == cols).float()
        return token_lp, entropy, top1


def _unique_inverse(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.unique(x, return_inverse=True), in one pass where x is already sorted (tree scoring's parent states
    are: rows in order, nodes breadth first)."""
    if len(x) and (x[1:] >= x[:-1]).all():
        new = np.empty(len(x), dtype=bool)
        new[0], new[1:] = True, x[1:] != x[:-1]
        return x[new], np.cumsum(new) - 1
    states, at = np.unique(x, return_inverse=True)
    return states, at.reshape(-1)
