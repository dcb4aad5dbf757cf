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
    """Next-token log-probabilities (full-vocabulary normalised) for just the tokens each row may take."""

    def start(self, prompts: Sequence[Sequence[int]], allowed: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Row i is prompts[i]; returns log P(allowed[i][j] | prompts[i]) as a 1-D tensor per row."""
        ...

    def step(
        self, parents: Sequence[int], tokens: Sequence[int], allowed: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Row j continues the previous call's row parents[j] with tokens[j]; log-probs of allowed[j]."""
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
    beams = [[_Beam(t.root, 0.0, r)] if len(t) else [] for r, t in enumerate(tries)]
    # Requests with an empty trie still get a row (a prompt) but no beams; they are never expanded.
    logp = model.start(prompts, [t.root.allowed() for t in tries])
    for level in range(depth):
        parents: list[int] = []
        tokens: list[int] = []
        new_beams: list[list[_Beam]] = []
        for req_beams, chosen in zip(beams, _expand(beams, logp, beam_width), strict=True):
            kept = []
            for beam_idx, tok, score in chosen:
                parent = req_beams[beam_idx]
                kept.append(_Beam(parent.node.children[tok], score, len(parents)))
                parents.append(parent.row)
                tokens.append(tok)
            new_beams.append(kept)
        beams = new_beams
        if level + 1 < depth and parents:
            allowed = [b.node.allowed() for req_beams in beams for b in req_beams]
            logp = model.step(parents, tokens, allowed)
    out = []
    for req_beams in beams:
        assert all(b.node.item is not None for b in req_beams), "beam ended inside the trie"
        out.append(Ranked([int(b.node.item) for b in req_beams], [b.score for b in req_beams]))  # type: ignore[arg-type]
    return out


def _expand(
    beams: list[list[_Beam]], logp: list[torch.Tensor], width: int
) -> list[list[tuple[int, int, float]]]:
    """Per request, the best `width` (beam index, token, score) continuations across its beams.

    One pass over every request's candidates at once (no per-request tensor work): candidates are laid
    out request by request, beam by beam, token by token; a stable sort by score then a stable sort by
    request keep, inside each request, score descending with ties in that order.
    """
    flat = [b for req in beams for b in req]
    if not flat:
        return [[] for _ in beams]
    allowed = [b.node.allowed() for b in flat]
    counts = torch.tensor([len(a) for a in allowed])
    beam_of = torch.repeat_interleave(torch.arange(len(flat)), counts)
    scores = torch.tensor([b.score for b in flat], dtype=torch.float64)[beam_of]
    scores += torch.cat([logp[b.row] for b in flat]).double()
    toks = torch.cat(allowed)
    sizes = [len(req) for req in beams]
    first_beam = torch.tensor([0, *sizes]).cumsum(0)[:-1]  # each request's first flat beam
    req_of = torch.repeat_interleave(torch.arange(len(beams)), torch.tensor(sizes))[beam_of]
    order = torch.argsort(-scores, stable=True)
    order = order[torch.argsort(req_of[order], stable=True)]
    grouped = req_of[order]
    rank = torch.arange(len(order)) - torch.searchsorted(grouped, grouped)  # position inside its request
    order = order[rank < width]
    kept_req = req_of[order]
    local = beam_of[order] - first_beam[kept_req]  # beam index inside its request
    out: list[list[tuple[int, int, float]]] = [[] for _ in beams]
    for r, b, t, sc in zip(
        kept_req.tolist(), local.tolist(), toks[order].tolist(), scores[order].tolist(), strict=True
    ):
        out[r].append((b, t, sc))
    return out
