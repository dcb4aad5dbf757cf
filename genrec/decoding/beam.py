"""Constrained beam search over a trie of item-ID token sequences, for any engine.

An engine supplies a `StepModel`: next-token log-probabilities for a batch of prompts, then for
rows that extend earlier rows by one token. The search only ever extends trie prefixes, so every
result is an item of the request's candidate set, and items are distinct because each trie leaf is
one item. Scores are sums of full-vocabulary log-probabilities of the ID tokens (log P(item |
prompt)); with beam_width >= the number of candidates the ranking is exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from genrec.decoding.trie import Trie, TrieNode


class StepModel(Protocol):
    def start(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """[len(prompts), vocab] log-probabilities of the first generated token."""
        ...

    def step(self, parents: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
        """Row j continues the previous call's row parents[j] with tokens[j]; [len(tokens), vocab]."""
        ...


@dataclass
class Ranked:
    """Top items for one request, best first, with log P(item | prompt)."""

    items: list[int]
    scores: list[float]


@dataclass
class _Beam:
    node: TrieNode
    score: float
    row: int


def constrained_beam_search(
    model: StepModel,
    prompts: Sequence[Sequence[int]],
    tries: Sequence[Trie],
    *,
    beam_width: int,
) -> list[Ranked]:
    """Beam search whose every step extends a prefix of the request's trie; returns <= beam_width items."""
    if len(prompts) != len(tries):
        raise ValueError("one trie per prompt")
    if beam_width < 1:
        raise ValueError("beam_width must be >= 1")
    depths = {t.depth for t in tries if len(t)}
    if len(depths) > 1:
        raise ValueError(f"all tries must have one depth, got {sorted(depths)}")
    depth = depths.pop() if depths else 0
    if depth == 0:
        return [Ranked([], []) for _ in prompts]
    logp = model.start(prompts)
    beams = [[_Beam(t.root, 0.0, r)] if len(t) else [] for r, t in enumerate(tries)]
    for level in range(depth):
        chosen = _expand_all(beams, logp, beam_width)
        parents: list[int] = []
        tokens: list[int] = []
        new_beams: list[list[_Beam]] = []
        for req_beams, req_chosen in zip(beams, chosen, strict=True):
            kept = []
            for beam_idx, tok, score in req_chosen:
                parent = req_beams[beam_idx]
                kept.append(_Beam(parent.node.children[tok], score, len(parents)))
                parents.append(parent.row)
                tokens.append(tok)
            new_beams.append(kept)
        beams = new_beams
        if level + 1 < depth and parents:
            logp = model.step(parents, tokens)
    out = []
    for req_beams in beams:
        assert all(b.node.item is not None for b in req_beams), "beam ended inside the trie"
        out.append(Ranked([int(b.node.item) for b in req_beams], [b.score for b in req_beams]))  # type: ignore[arg-type]
    return out


def _expand_all(
    beams: list[list[_Beam]], logp: torch.Tensor, width: int
) -> list[list[tuple[int, int, float]]]:
    """Per request, the best `width` (beam index, token, score) continuations across its beams.

    One gather over all requests' allowed tokens per step keeps device syncs to one.
    """
    rows, toks, sizes = [], [], []
    for req_beams in beams:
        n = 0
        for b in req_beams:
            allowed = b.node.allowed()
            rows.append(torch.full((len(allowed),), b.row, dtype=torch.long))
            toks.append(allowed)
            n += len(allowed)
        sizes.append(n)
    if not rows:
        return [[] for _ in beams]
    all_toks = torch.cat(toks)
    gathered = logp[torch.cat(rows).to(logp.device), all_toks.to(logp.device)].double().cpu()
    out: list[list[tuple[int, int, float]]] = []
    offset = 0
    for req_beams, n in zip(beams, sizes, strict=True):
        if n == 0:
            out.append([])
            continue
        base = torch.cat(
            [torch.full((len(b.node.allowed()),), b.score, dtype=torch.float64) for b in req_beams]
        )
        which = torch.cat(
            [torch.full((len(b.node.allowed()),), i, dtype=torch.long) for i, b in enumerate(req_beams)]
        )
        scores = base + gathered[offset : offset + n]
        req_toks = all_toks[offset : offset + n]
        offset += n
        # Stable order for ties: score descending, then candidate position.
        order = torch.argsort(-scores, stable=True)[: min(width, n)]
        out.append([(int(which[i]), int(req_toks[i]), float(scores[i])) for i in order])
    return out
