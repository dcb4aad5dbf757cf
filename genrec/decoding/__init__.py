"""Constrained decoding: candidate tries and the beam search that stays inside them."""

from genrec.decoding.beam import Ranked, StepModel, constrained_beam_search
from genrec.decoding.trie import Trie

__all__ = ["Ranked", "StepModel", "Trie", "constrained_beam_search"]
