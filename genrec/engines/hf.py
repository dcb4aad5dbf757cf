"""Transformers engine: exact tree scoring of small tries, beam search with a KV cache for large ones.

Works on CPU and GPU; always available. A request whose trie feeds at most `max_tree_tokens` tree
tokens (retrieved candidates, small catalogues) is ranked exactly in one forward pass with tree
attention (genrec.decoding.tree); larger tries (the full catalogue of a big run) get the constrained
beam search: batched prompt prefill, then one token per beam per ID level. Also offers brute-force
scoring of candidate sequences (teacher forcing), the reference both are tested against.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from genrec.decoding import Ranked, Trie, constrained_beam_search
from genrec.decoding.tree import TreeLayout, layout, top_items
from genrec.engines.base import ChatPrompts

SEARCHES = ("auto", "beam", "exact")
TREE_ATTENTION = ("sdpa", "eager")
"""Attention implementations that take the custom 4-D mask tree scoring needs (flash kernels do not)."""
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
"""Every SDPA kernel but cuDNN's, which plans each new shape on the CPU first: about 5 ms per layer
call on an H100 with the masks of tree scoring and padded batches (measured, BENCHMARKS.md), and
every request brings its own length."""


@contextmanager
def attention_kernels(device: torch.device) -> Iterator[None]:
    """Keep cuDNN attention out of the engine's model calls on a GPU; nothing changes on a CPU."""
    if device.type != "cuda":
        yield
        return
    with sdpa_kernel(SDPA_BACKENDS):
        yield


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts as one left-padded batch: token ids and the attention mask (1 on real tokens)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


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
        ids, mask = left_pad(prompts, self.pad_id)
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


class TreeScorer:
    """log P(item | prompt) for every item of each request's trie, one forward per batch of requests.

    Each row is [left padding, prompt, tree tokens]; a 4-D mask lets the prompt attend
    causally and each tree token attend to the prompt, its ancestors and itself; position ids put
    a tree token where it would sit in its own sequence. Rows are packed by length so that a batch's
    mask stays under `mask_budget` elements and its kept logits under `logits_budget`.
    """

    def __init__(
        self, model: Any, *, pad_id: int, mask_budget: int = 1 << 26, logits_budget: int = 1 << 27
    ) -> None:
        self.model = model
        self.pad_id = pad_id
        self.mask_budget = mask_budget
        self.logits_budget = logits_budget
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.vocab = int(model.get_output_embeddings().weight.shape[0])

    def rank(self, prompts: Sequence[Sequence[int]], layouts: Sequence[TreeLayout], k: int) -> list[Ranked]:
        out: list[Ranked] = [Ranked([], []) for _ in prompts]
        size = [len(p) + lay.n_inputs for p, lay in zip(prompts, layouts, strict=True)]
        batch: list[int] = []
        kept = 0
        for i in sorted(range(len(prompts)), key=size.__getitem__):  # the row joining is the widest so far
            kept = max(kept, layouts[i].n_inputs + 1)
            rows = len(batch) + 1
            if batch and (
                rows * size[i] ** 2 > self.mask_budget or rows * kept * self.vocab > self.logits_budget
            ):
                self._run(prompts, layouts, batch, k, out)
                batch, kept = [], layouts[i].n_inputs + 1
            batch.append(i)
        if batch:
            self._run(prompts, layouts, batch, k, out)
        return out

    def _tree_mask(self, width: int, prompt_at: torch.Tensor, tree_at: torch.Tensor) -> torch.Tensor:
        """(rows, width, width) bool, built on the device: the prompt attends causally, tree tokens attend
        to the whole prompt (their ancestors are added by the caller), padding attends to itself."""
        at = torch.arange(width, device=self.device)
        prompt = (at >= prompt_at[:, None]) & (at < tree_at[:, None])
        tree, pad = at >= tree_at[:, None], at < prompt_at[:, None]
        causal = at[None, :] <= at[:, None]
        allow = prompt[:, :, None] & prompt[:, None, :] & causal
        allow |= tree[:, :, None] & prompt[:, None, :]
        allow |= pad[:, :, None] & torch.eye(width, dtype=torch.bool, device=self.device)  # no empty rows
        return allow

    @torch.inference_mode()
    def _run(
        self,
        prompts: Sequence[Sequence[int]],
        layouts: Sequence[TreeLayout],
        rows: list[int],
        k: int,
        out: list[Ranked],
    ) -> None:
        width = max(len(prompts[r]) + layouts[r].n_inputs for r in rows)
        kept = max(layouts[r].n_inputs for r in rows) + 1
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        pos = torch.zeros((len(rows), width), dtype=torch.long)
        prompt_at = torch.zeros(len(rows), dtype=torch.long)  # where each row's prompt starts
        tree_at = torch.zeros(len(rows), dtype=torch.long)  # and its tree tokens
        pairs_b, pairs_q, pairs_k = [], [], []
        for b, r in enumerate(rows):
            p, lay = prompts[r], layouts[r]
            n, t = len(p), lay.n_inputs
            o = width - n - t
            prompt_at[b], tree_at[b] = o, o + n
            ids[b, o : o + n] = torch.tensor(list(p), dtype=torch.long)
            ids[b, o + n :] = lay.tokens
            pos[b, o : o + n] = torch.arange(n)
            pos[b, o + n :] = n + lay.positions
            query, key = lay.ancestor_pairs()
            pairs_b.append(torch.full((len(query),), b))
            pairs_q.append(query + o + n)
            pairs_k.append(key + o + n)
        allow = self._tree_mask(width, prompt_at.to(self.device), tree_at.to(self.device))
        pairs = [torch.cat(x).to(self.device) for x in (pairs_b, pairs_q, pairs_k)]
        allow[pairs[0], pairs[1], pairs[2]] = True  # tree tokens see themselves and their ancestors
        mask = allow  # sdpa takes a boolean mask (True: attend), as transformers' own sdpa masks are
        if getattr(self.model.config, "_attn_implementation", None) != "sdpa":  # eager adds it to the scores
            mask = torch.zeros(allow.shape, dtype=self.dtype, device=self.device)
            mask.masked_fill_(~allow, torch.finfo(self.dtype).min)
        logits = self.model(
            input_ids=ids.to(self.device),
            attention_mask=mask[:, None],
            position_ids=pos.to(self.device),
            logits_to_keep=kept,
            use_cache=False,  # one pass: a KV cache would only be filled and thrown away
        ).logits
        step = max(1, (1 << 25) // (kept * logits.shape[-1]))  # float32 log-normalisers, a few rows at a time
        lse = torch.cat([torch.logsumexp(chunk.float(), dim=-1) for chunk in logits.split(step)])
        # every edge's log-prob in one gather and one transfer; slot 0 of a row is its prompt's last token
        lays = [layouts[r] for r in rows]
        sizes = [len(lay.token) - 1 for lay in lays]
        row = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(sizes)).to(self.device)
        slot = torch.cat([lay.parent[1:] + kept - lay.n_inputs - 1 for lay in lays]).to(self.device)
        tok = torch.cat([lay.token[1:] for lay in lays]).to(self.device)
        edges = (logits[row, slot, tok].float() - lse[row, slot]).cpu().split(sizes)
        for r, lay, edge in zip(rows, lays, edges, strict=True):
            scores = lay.item_scores(torch.cat([torch.zeros(1), edge]))
            out[r] = Ranked(*top_items(lay, scores, k))


class HFEngine(ChatPrompts):
    """Engine over a transformers model already loaded (see genrec.modeling.load_trained).

    `search`: "auto" ranks a request exactly (tree scoring) when its trie feeds at most
    `max_tree_tokens` tree tokens and by beam search otherwise; "beam" and "exact" force one way.
    """

    name = "hf"
    concurrent = False

    def __init__(
        self, model: Any, tokenizer: Any, *, search: str = "auto", max_tree_tokens: int = 1024
    ) -> None:
        if search not in SEARCHES:
            raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad)
        attn = getattr(model.config, "_attn_implementation", None)
        if search == "exact" and attn not in TREE_ATTENTION:
            raise ValueError(f"search='exact' needs attention {TREE_ATTENTION}, the model uses {attn!r}")
        self.search = search if attn in TREE_ATTENTION else "beam"
        self.max_tree_tokens = max_tree_tokens
        self.ranked_by: Counter[str] = Counter()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def rank(
        self, prompts: Sequence[Sequence[int]], tries: Sequence[Trie], *, beam_width: int
    ) -> list[Ranked]:
        """Top `beam_width` items per request: exact where the trie is small enough, else beam search."""
        if len(prompts) != len(tries):
            raise ValueError("one trie per prompt")
        with attention_kernels(self.device):
            return self._rank(prompts, tries, beam_width)

    def _rank(self, prompts: Sequence[Sequence[int]], tries: Sequence[Trie], beam_width: int) -> list[Ranked]:
        limit = None if self.search == "exact" else self.max_tree_tokens
        layouts: dict[int, TreeLayout] = {}
        if self.search != "beam":
            for i, t in enumerate(tries):
                lay = layout(t, max_inputs=limit) if len(t) and t.depth else None
                if lay is not None:
                    layouts[i] = lay
        out: list[Ranked] = [Ranked([], []) for _ in prompts]
        if layouts:
            tree = list(layouts)
            scorer = TreeScorer(self.model, pad_id=self.pad_id)
            ranked = scorer.rank([prompts[i] for i in tree], [layouts[i] for i in tree], beam_width)
            for i, r in zip(tree, ranked, strict=True):
                out[i] = r
        rest = [i for i in range(len(prompts)) if i not in layouts]
        self.ranked_by.update(exact=len(layouts), beam=len(rest))
        if rest:
            ranked = constrained_beam_search(
                HFStepModel(self.model, pad_id=self.pad_id),
                [prompts[i] for i in rest],
                [tries[i] for i in rest],
                beam_width=beam_width,
            )
            for i, r in zip(rest, ranked, strict=True):
                out[i] = r
        return out

    @torch.inference_mode()
    def greedy(self, prompts: Sequence[Sequence[int]], *, max_tokens: int) -> list[list[int]]:
        """Unconstrained greedy decoding of max_tokens tokens with `generate` (the speed reference)."""
        ids, mask = left_pad(prompts, self.pad_id)
        with attention_kernels(self.device):
            out = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=self.pad_id,
            )
        return [row[ids.shape[1] :].tolist() for row in out]

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
            with attention_kernels(self.device):
                logits = self.model(input_ids=ids.to(self.device)).logits.float()
            logp = torch.log_softmax(logits, dim=-1).cpu()
            for i, c in enumerate(chunk):
                positions = torch.arange(len(p) - 1, len(p) - 1 + len(c))
                out.append(float(logp[i, positions, torch.tensor(c)].double().sum()))
        return out
