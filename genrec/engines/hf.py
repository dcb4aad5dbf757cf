"""Transformers engine: batched prompt prefill with a KV cache, then one token per beam per step.

Works on CPU and GPU; always available. Also offers exact brute-force scoring of candidate
sequences (teacher forcing), the reference the beam search is tested against.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from genrec.decoding import Ranked, Trie, constrained_beam_search
from genrec.engines.base import encode_chat


class HFStepModel:
    """StepModel over a transformers causal LM, left-padded batches, explicit position ids."""

    def __init__(self, model: Any, *, pad_id: int) -> None:
        self.model = model
        self.pad_id = pad_id
        self.device = next(model.parameters()).device
        self.cache: Any = None
        self.mask: torch.Tensor | None = None
        self.next_pos: torch.Tensor | None = None

    def _gather(self, logits: torch.Tensor, allowed: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Full-vocabulary log-softmax, then only each row's allowed tokens move to the CPU."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        rows = torch.cat([torch.full((len(a),), i, dtype=torch.long) for i, a in enumerate(allowed)])
        flat = logp[rows.to(self.device), torch.cat(list(allowed)).to(self.device)].cpu()
        return list(flat.split([len(a) for a in allowed]))

    @torch.inference_mode()
    def start(self, prompts: Sequence[Sequence[int]], allowed: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
            mask[i, width - len(p) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        self.cache, self.mask, self.next_pos = out.past_key_values, mask, pos[:, -1] + 1
        return self._gather(out.logits[:, -1], allowed)

    @torch.inference_mode()
    def step(
        self, parents: Sequence[int], tokens: Sequence[int], allowed: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        assert self.mask is not None and self.next_pos is not None, "start() first"
        idx = torch.tensor(list(parents), dtype=torch.long, device=self.device)
        self.cache.reorder_cache(idx)
        mask = torch.cat(
            [self.mask[idx], torch.ones((len(idx), 1), dtype=torch.long, device=self.device)], dim=1
        )
        pos = self.next_pos[idx]
        toks = torch.tensor(list(tokens), dtype=torch.long, device=self.device)[:, None]
        out = self.model(
            input_ids=toks,
            attention_mask=mask,
            position_ids=pos[:, None],
            past_key_values=self.cache,
            use_cache=True,
        )
        self.cache, self.mask, self.next_pos = out.past_key_values, mask, pos + 1
        return self._gather(out.logits[:, -1], allowed)


class HFEngine:
    """Engine over a transformers model already loaded (see genrec.modeling.load_trained)."""

    name = "hf"
    concurrent = False

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode_messages(self, messages: list[dict[str, str]]) -> list[int]:
        return encode_chat(self.tokenizer, messages)

    def rank(
        self, prompts: Sequence[Sequence[int]], tries: Sequence[Trie], *, beam_width: int
    ) -> list[Ranked]:
        return constrained_beam_search(
            HFStepModel(self.model, pad_id=self.pad_id), prompts, tries, beam_width=beam_width
        )

    @torch.inference_mode()
    def score(
        self, prompt: Sequence[int], continuations: Sequence[Sequence[int]], *, batch_size: int = 64
    ) -> list[float]:
        """Exact log P(continuation | prompt) for each continuation, one full forward each (reference)."""
        out: list[float] = []
        p = list(prompt)
        for start in range(0, len(continuations), batch_size):
            chunk = [list(c) for c in continuations[start : start + batch_size]]
            width = len(p) + max(len(c) for c in chunk)
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            for i, c in enumerate(chunk):  # right padding: positions stay 0..n-1
                ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            logits = self.model(input_ids=ids.to(self.device)).logits.float()
            logp = torch.log_softmax(logits, dim=-1).cpu()
            for i, c in enumerate(chunk):
                positions = torch.arange(len(p) - 1, len(p) - 1 + len(c))
                out.append(float(logp[i, positions, torch.tensor(c)].double().sum()))
        return out
