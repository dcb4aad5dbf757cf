"""Transformers engine: exact tree scoring of small tries, beam search with a KV cache for large ones.

Works on CPU and GPU; always available. A request whose trie feeds at most `max_tree_tokens` tree
tokens (retrieved candidates, small catalogues) is ranked exactly in one forward pass with tree
attention (genrec.decoding.tree); larger tries (the full catalogue of a big run) get the constrained
beam search: batched prompt prefill, then one token per beam per ID level. Also offers brute-force
scoring of candidate sequences (teacher forcing), the reference both are tested against.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from genrec.config import SEARCHES
from genrec.decoding import Ranked, Trie, constrained_beam_search
from genrec.decoding.tree import TopItems, TreeLayout, concat_ranges, layouts, to_device
from genrec.engines.base import ChatPrompts, RankByLaunch, tries_at
from genrec.id_softmax import IdSoftmax, group_softmax

logger = logging.getLogger(__name__)

TREE_ATTENTION = ("sdpa", "eager")
"""Attention implementations that take the custom 4-D mask tree scoring needs (flash kernels do not)."""
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
"""Every SDPA kernel but cuDNN's, which plans each new shape on the CPU first: about 5 ms per layer
call on an H100 with the masks of tree scoring and padded batches (measured, BENCHMARKS.md), and
every request brings its own length."""
STATIC_TOLERANCE = 0.02
"""Largest relative gap, mean |difference| / mean |log-prob|, allowed between StaticForward's edge log-probs
and the model's own forward at first use. bf16 rounding differs with the padded shape: a single edge of the
trained demo model in bf16 differed by 0.06 on the H100, which turned graphs off under the earlier check of the
largest absolute gap; a mean over all edges is not thrown by one. A model whose output head is not a plain
linear layer (logit soft-capping or scaling) differs by far more and goes back to eager calls."""


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
    """StepModel over a transformers causal LM, left-padded batches, explicit position ids. With `softmax`
    (a restricted model.id_softmax), the decoder's last states go through the output head's rows of one group."""

    def __init__(self, model: Any, *, pad_id: int, softmax: IdSoftmax | None = None) -> None:
        self.model = model
        self.pad_id = pad_id
        self.softmax = softmax
        self.device = next(model.parameters()).device
        self.cache: Any = None
        self.mask: torch.Tensor | None = None
        self.next_pos: torch.Tensor | None = None

    def _forward(self, **inputs: Any) -> tuple[Any, torch.Tensor]:
        """(KV cache, the last position's logits, or its hidden states under `softmax`)."""
        if self.softmax is None:
            out = self.model(**inputs, use_cache=True, logits_to_keep=1)  # a prompt's last logits only
            return out.past_key_values, out.logits[:, -1]
        out = self.model.get_decoder()(**inputs, use_cache=True)
        return out.past_key_values, out.last_hidden_state[:, -1]

    def _gather(self, last: torch.Tensor, allowed: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each row's allowed tokens' log-probs, moved to the CPU: a full-vocabulary log-softmax of the
        logits, or (`softmax`) each row's states through its group's rows."""
        rows = np.repeat(np.arange(len(allowed)), [len(a) for a in allowed])
        toks = torch.cat(list(allowed))
        if self.softmax is not None:
            groups = self.softmax.by_group(rows, toks.numpy())
            head = self.model.get_output_embeddings()
            flat = self.softmax.edge_log_probs(last, head, groups, len(toks)).cpu()
        else:
            logp = torch.log_softmax(last.float(), dim=-1)
            flat = logp[torch.from_numpy(rows).to(self.device), toks.to(self.device)].cpu()
        return list(flat.split([len(a) for a in allowed]))

    @torch.inference_mode()
    def start(self, prompts: Sequence[Sequence[int]], allowed: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        ids, mask = left_pad(prompts, self.pad_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        self.cache, last = self._forward(input_ids=ids, attention_mask=mask, position_ids=pos)
        self.mask, self.next_pos = mask, pos[:, -1] + 1
        return self._gather(last, allowed)

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
        self.cache, last = self._forward(
            input_ids=toks, attention_mask=mask, position_ids=pos[:, None], past_key_values=self.cache
        )
        self.mask, self.next_pos = mask, pos + 1
        return self._gather(last, allowed)


class StaticForward:
    """The decoder's forward at a few fixed shapes, replayed from CUDA graphs on a GPU.

    Tree scoring brings a new (rows, width) with nearly every request, and eager PyTorch pays its CPU
    side (about 40 kernel launches per layer, plus transformers' Python) on every call: for one request
    on an H100 that is most of the time (BENCHMARKS.md, "CUDA graphs"). Here a batch of at most
    `max_rows` rows and `max_width` tokens is padded up to a bucket (rows to a power of two, width to a
    multiple of `width_step`); each bucket's graph is captured at its first use (shared memory pool,
    `max_graphs` kept, least recently used dropped) and replayed after. The graph covers the decoder;
    the caller applies the output head to the few positions it needs. `capture=False` runs the same
    padded shapes eagerly: the CPU tests use it to check that padding changes no result.
    """

    def __init__(
        self,
        model: Any,
        *,
        capture: bool,
        width_step: int = 64,
        max_width: int = 2048,
        max_rows: int = 8,
        max_graphs: int = 64,
    ) -> None:
        self.decoder = model.get_decoder()
        self.head = model.get_output_embeddings()
        self.capture = capture
        self.width_step, self.max_width, self.max_rows, self.max_graphs = (
            width_step,
            max_width,
            max_rows,
            max_graphs,
        )
        self.graphs: OrderedDict[tuple[int, int], _Graph] = OrderedDict()
        self.pool: Any = None
        self.verified = False
        """Whether graph-and-head scoring was checked against the model's own forward (first use)."""
        self.disabled: str | None = None
        """Why the engine went back to eager calls for good (a failed capture or check), if it did."""
        self.captured = 0
        self.gap: float | None = None
        """The relative gap measured at the first-use check."""

    def bucket(self, rows: int, width: int) -> tuple[int, int] | None:
        """The padded (rows, width) a batch runs at, or None where it goes eager (too big, or disabled)."""
        if self.disabled is not None or rows > self.max_rows or width > self.max_width:
            return None
        padded_rows = 1 << (rows - 1).bit_length()
        return padded_rows, -(-width // self.width_step) * self.width_step

    def hidden(self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(rows, width, hidden) last hidden states; inputs already at a bucket's shape, on the device.
        With graphs the result is the graph's output buffer: read it before the next call."""
        if not self.capture:
            return self._forward(ids, pos, mask)
        key = (int(ids.shape[0]), int(ids.shape[1]))
        graph = self.graphs.get(key)
        if graph is None:
            graph = self._capture(ids, pos, mask)
            self.graphs[key] = graph
            if len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        graph.ids.copy_(ids)
        graph.pos.copy_(pos)
        graph.mask.copy_(mask)
        graph.graph.replay()
        return graph.out

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.decoder(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
        return out.last_hidden_state

    def _capture(self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> _Graph:
        static = (ids.clone(), pos.clone(), mask.clone())
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture (workspaces, lazy init), as PyTorch asks
            for _ in range(2):
                self._forward(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # One pool for all graphs: a capture may reuse memory another graph used only inside its own replay.
        # That is safe in any replay order here because replays never overlap and each output is read
        # (copied out) before the next replay; static inputs live outside the pool.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = self._forward(*static)
        self.pool = graph.pool()
        self.captured += 1
        return _Graph(graph, *static, out)


@dataclass
class _Graph:
    """A captured forward and its static buffers: inputs copied in before each replay, output read after."""

    graph: Any
    ids: torch.Tensor
    pos: torch.Tensor
    mask: torch.Tensor
    out: torch.Tensor


class TreeScorer:
    """log P(item | prompt) for every item of each request's trie, one forward per batch of requests.

    Each row is [left padding, prompt, tree tokens]; a 4-D mask lets the prompt attend
    causally and each tree token attend to the prompt, its ancestors and itself; position ids put
    a tree token where it would sit in its own sequence. Rows are packed by length so that a batch's
    mask stays under `mask_budget` elements and its kept logits under `logits_budget`. With `static`
    (see StaticForward), small batches run padded to a fixed shape, from CUDA graphs on a GPU. With
    `softmax` (model.id_softmax ids or level), each parent node's state goes through its children's group's rows.
    """

    def __init__(
        self,
        model: Any,
        *,
        pad_id: int,
        mask_budget: int = 1 << 26,
        logits_budget: int = 1 << 27,
        static: StaticForward | None = None,
        softmax: IdSoftmax | None = None,
    ) -> None:
        self.model = model
        self.pad_id = pad_id
        self.mask_budget = mask_budget
        self.logits_budget = logits_budget
        self.static = static
        self.softmax = softmax
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        # the widest logits a parent state gets
        self.vocab = int(model.get_output_embeddings().weight.shape[0]) if softmax is None else softmax.widest

    def rank(self, prompts: Sequence[Sequence[int]], layouts: Sequence[TreeLayout], k: int) -> list[Ranked]:
        """Each request's k best items (`launch`, then its result)."""
        return self.launch(prompts, layouts, k)()

    def launch(
        self, prompts: Sequence[Sequence[int]], layouts: Sequence[TreeLayout], k: int
    ) -> Callable[[], list[Ranked]]:
        """Queue every batch of rows on the device and return a call that waits for them and gives each
        request's k best items. Nothing here waits for the device (on a GPU): each batch is packed on the CPU
        while the device runs the one before, and a caller can prepare its next call while the last batch runs."""
        launched = [
            (rows, self._launch(prompts, layouts, rows, k)) for rows in self._batches(prompts, layouts)
        ]

        def result() -> list[Ranked]:
            out: list[Ranked] = [Ranked([], []) for _ in prompts]
            for rows, top in launched:
                self._finish(rows, top, out)
            return out

        return result

    def _batches(
        self, prompts: Sequence[Sequence[int]], layouts: Sequence[TreeLayout]
    ) -> Iterator[list[int]]:
        """Rows packed by length, each batch's mask under `mask_budget` and its kept logits under `logits_budget`."""
        size = [len(p) + lay.n_inputs for p, lay in zip(prompts, layouts, strict=True)]
        batch: list[int] = []
        kept = 0
        for i in sorted(range(len(prompts)), key=size.__getitem__):  # the row joining is the widest so far
            kept = max(kept, layouts[i].n_inputs + 1)
            rows = len(batch) + 1
            if batch and (
                rows * size[i] ** 2 > self.mask_budget or rows * kept * self.vocab > self.logits_budget
            ):
                yield batch
                batch, kept = [], layouts[i].n_inputs + 1
            batch.append(i)
        if batch:
            yield batch

    @staticmethod
    def _finish(rows: list[int], top: TopItems, out: list[Ranked]) -> None:
        for r, best in zip(rows, top.result(), strict=True):
            out[r] = Ranked(*best)

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

    def _inputs(
        self, prompts: Sequence[Sequence[int]], lays: Sequence[TreeLayout], n_rows: int, width: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token ids, position ids and the 4-D mask of `n_rows` rows of `width` on the device; rows past
        the requests are all padding. Packed on the CPU (`pack`), sent in one copy, the mask built on the device
        with no wait for it: `allow[rows, queries, keys] = True` would copy the Python scalar to the device as a
        CPU tensor, a blocking copy (index_put_ with a 0-dim value), so the pairs are filled by their flat
        indices with `index_fill_`, whose value is a kernel argument."""
        ids_d, pos_d, prompt_d, tree_d, seen_d = to_device(
            self.pack(prompts, lays, n_rows, width), self.device
        )
        allow = self._tree_mask(width, prompt_d, tree_d)
        allow.view(-1).index_fill_(0, seen_d, True)  # tree tokens see themselves and their ancestors
        mask = allow  # sdpa takes a boolean mask (True: attend), as transformers' own sdpa masks are
        if getattr(self.model.config, "_attn_implementation", None) != "sdpa":  # eager adds it to the scores
            mask = torch.zeros(allow.shape, dtype=self.dtype, device=self.device)
            mask.masked_fill_(~allow, torch.finfo(self.dtype).min)
        return ids_d, pos_d, mask[:, None]

    def pack(
        self, prompts: Sequence[Sequence[int]], lays: Sequence[TreeLayout], n_rows: int, width: int
    ) -> list[np.ndarray]:
        """A batch's inputs as numpy, with no loop over rows: token ids and position ids (n_rows, width), where
        each row's prompt and tree tokens start, and the flat indices into the (n_rows, width, width) mask of
        the tree tokens' attention to themselves and their ancestors (row * width**2 + query * width + key)."""
        rows = len(lays)
        n = np.array([len(p) for p in prompts], dtype=np.int64)
        t = np.array([lay.n_inputs for lay in lays], dtype=np.int64)
        prompt_at = np.full(n_rows, width, dtype=np.int64)  # where each row's prompt starts
        tree_at = np.full(n_rows, width, dtype=np.int64)  # and its tree tokens
        prompt_at[:rows] = width - n - t
        tree_at[:rows] = width - t
        # every row's prompt then tree tokens, flat, and where each goes (rows right-aligned in `width`)
        flat_ids = np.concatenate([x for p, lay in zip(prompts, lays, strict=True) for x in (p, lay.tokens)])
        is_tree = np.repeat(np.tile([False, True], rows), np.stack([n, t], axis=1).ravel())
        at = concat_ranges(np.arange(rows) * width + prompt_at[:rows], n + t)
        flat_pos = concat_ranges(np.zeros(rows, dtype=np.int64), n + t)  # a prompt token's: its index
        # a tree token sits where it would in its own sequence
        flat_pos[is_tree] = np.repeat(n, t) + np.concatenate([lay.positions for lay in lays])
        ids_flat = np.full(n_rows * width, self.pad_id, dtype=np.int64)
        pos_flat = np.zeros(n_rows * width, dtype=np.int64)
        ids_flat[at], pos_flat[at] = flat_ids, flat_pos
        ids, pos = ids_flat.reshape(n_rows, width), pos_flat.reshape(n_rows, width)
        pair = [lay.ancestor_pairs() for lay in lays]
        n_pairs = np.array([len(q) for q, _ in pair], dtype=np.int64)
        # each pair's row offset in the flat mask, plus its query's row and key's column shifted by tree_at
        base = np.repeat(np.arange(rows) * width * width + tree_at[:rows] * (width + 1), n_pairs)
        query = np.concatenate([q.numpy() for q, _ in pair])
        key = np.concatenate([k.numpy() for _, k in pair])
        return [ids, pos, prompt_at, tree_at, base + query * width + key]

    @staticmethod
    def _edges(lays: Sequence[TreeLayout]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every edge of every row (rows concatenated): its row, its parent node (0: the prompt's last
        token), its token."""
        # numpy views first: slicing a small torch tensor costs more than the rest of the row's work
        parents = [lay.parent.numpy()[1:] for lay in lays]
        row = np.repeat(np.arange(len(lays)), [len(x) for x in parents])
        parent = np.concatenate(parents)
        tok = np.concatenate([lay.token.numpy()[1:] for lay in lays])
        return row, parent, tok

    def _edge_logp_model(
        self, lays: Sequence[TreeLayout], ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Every edge's log-prob (rows concatenated, on the device) from the model's own forward (its
        output head as it defines it; under `softmax`, the decoder's and the head's rows of each group)."""
        if self.softmax is not None:
            hidden = self.model.get_decoder()(
                input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False
            ).last_hidden_state
            return self._edge_logp_states(lays, hidden, self.model.get_output_embeddings())
        kept = max(lay.n_inputs for lay in lays) + 1
        row, parent, tok = self._edges(lays)
        # every edge's log-prob in one gather; the last `kept` columns are kept
        n_inputs = np.array([lay.n_inputs for lay in lays])
        row_d, slot_d, tok_d = to_device([row, parent + kept - n_inputs[row] - 1, tok], self.device)
        logits = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            logits_to_keep=kept,
            use_cache=False,  # one pass: a KV cache would only be filled and thrown away
        ).logits
        step = max(1, (1 << 25) // (kept * logits.shape[-1]))  # float32 log-normalisers, a few rows at a time
        lse = torch.cat([torch.logsumexp(chunk.float(), dim=-1) for chunk in logits.split(step)])
        return logits[row_d, slot_d, tok_d].float() - lse[row_d, slot_d]

    def _edge_logp_static(
        self, lays: Sequence[TreeLayout], ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Edge log-probs from StaticForward's hidden states and the output head on the parent nodes only."""
        assert self.static is not None
        return self._edge_logp_states(lays, self.static.hidden(ids, pos, mask), self.static.head)

    def edge_index(
        self, lays: Sequence[TreeLayout], width: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """For the output head on the parent nodes only: the (row, column) of every parent state (each row's
        prompt end and internal nodes, rows concatenated), and each edge's parent state and token."""
        n_parents = np.array([lay.n_inputs + 1 for lay in lays], dtype=np.int64)
        col = concat_ranges(width - n_parents, n_parents)
        prow = np.repeat(np.arange(len(lays)), n_parents)
        row, parent, tok = self._edges(lays)
        # each edge's parent state: its row's first state plus its parent node
        edge_state = (np.cumsum(n_parents) - n_parents)[row] + parent
        return prow, col, edge_state, tok

    def _edge_logp_states(self, lays: Sequence[TreeLayout], hidden: torch.Tensor, head: Any) -> torch.Tensor:
        """Edge log-probs from the decoder's (rows, width, hidden) states: the output `head` (or, under
        `softmax`, each group's rows of it) on the parent nodes only."""
        prow, col, edge_state, tok_cpu = self.edge_index(lays, hidden.shape[1])
        if self.softmax is not None:
            col_d, prow_d = to_device([col, prow], self.device)
            groups = self.softmax.by_group(edge_state, tok_cpu)
            return self.softmax.edge_log_probs(hidden[prow_d, col_d], head, groups, len(tok_cpu))
        col_d, prow_d = to_device([col, prow], self.device)
        states = hidden[prow_d, col_d]  # copied out of the graph's buffer
        out = torch.empty(len(tok_cpu), dtype=torch.float32, device=self.device)
        step = max(1, (1 << 25) // self.vocab)
        for lo in range(0, len(states), step):
            logp = torch.log_softmax(head(states[lo : lo + step]).float(), dim=-1)
            # this chunk's edges, chosen on the CPU: a selection on the device would wait for it
            sel = np.flatnonzero((edge_state >= lo) & (edge_state < lo + step))
            sel_d, at_d, tok_d = to_device([sel, edge_state[sel] - lo, tok_cpu[sel]], self.device)
            out[sel_d] = logp[at_d, tok_d]
        return out

    @torch.inference_mode()
    def _launch(
        self, prompts: Sequence[Sequence[int]], layouts: Sequence[TreeLayout], rows: list[int], k: int
    ) -> TopItems:
        """One batch of rows queued on the device (packed here first); `TopItems.result()` reads it back."""
        ps, lays = [prompts[r] for r in rows], [layouts[r] for r in rows]
        top = TopItems(lays, k)
        width = max(len(p) + lay.n_inputs for p, lay in zip(ps, lays, strict=True))
        shape = self.static.bucket(len(rows), width) if self.static is not None else None
        if shape is None:
            edges = self._edge_logp_model(lays, *self._inputs(ps, lays, len(rows), width))
        else:
            edges = self._run_static(ps, lays, width, shape)
        return top.launch(edges)

    def _run_static(
        self, ps: Sequence[Sequence[int]], lays: Sequence[TreeLayout], width: int, shape: tuple[int, int]
    ) -> torch.Tensor:
        """Through StaticForward at the padded `shape`; its first use is checked against the model's own
        forward on the unpadded batch, and any failure (a capture, or a model whose output head is more
        than a linear layer) sends the engine back to eager calls for good."""
        assert self.static is not None
        inputs = self._inputs(ps, lays, *shape)
        try:
            edges = self._edge_logp_static(lays, *inputs)
        except Exception as e:  # any capture failure: rank eagerly, say so once
            self.static.disabled = f"{type(e).__name__}: {e}"
            logger.warning("CUDA graphs off for tree scoring: %s", self.static.disabled)
            return self._edge_logp_model(lays, *self._inputs(ps, lays, len(ps), width))
        if not self.static.verified:
            ref = self._edge_logp_model(lays, *self._inputs(ps, lays, len(ps), width))
            gap = float((edges - ref).abs().mean() / ref.abs().mean().clamp(min=1e-6)) if len(ref) else 0.0
            self.static.verified, self.static.gap = True, gap
            if gap > STATIC_TOLERANCE:
                self.static.disabled = (
                    f"its log-probs differ from the model's forward by {gap:.3g} (relative)"
                )
                logger.warning("CUDA graphs off for tree scoring: %s", self.static.disabled)
                return ref
        return edges


def tree_layouts(tries: Sequence[Trie], search: str, max_tree_tokens: int) -> dict[int, TreeLayout]:
    """Layouts of the tries ranked exactly under `search` (`exact`: all; `auto`: those feeding at most
    `max_tree_tokens` tree tokens), by position, with their ancestor pairs ready; the rest get beam search."""
    limit = None if search == "exact" else max_tree_tokens
    some = [i for i, t in enumerate(tries) if len(t) and t.depth]
    out: dict[int, TreeLayout] = {}
    for i, lay in zip(some, layouts([tries[i] for i in some], max_inputs=limit), strict=True):
        if lay is not None:
            lay.ancestor_pairs()
            out[i] = lay
    return out


class HFEngine(RankByLaunch, ChatPrompts):
    """Engine over a transformers model already loaded (see genrec.modeling.load_trained).

    `search`: "auto" ranks a request exactly (tree scoring) when its trie feeds at most
    `max_tree_tokens` tree tokens and by beam search otherwise; "beam" and "exact" force one way.
    `cuda_graphs`: on a GPU, tree scoring of small batches (a served request) replays CUDA graphs
    (StaticForward); off for a model still being trained. `level_tokens`: each ID level's tokens, for a
    `softmax_groups`: the ID-token groups a model trained with model.id_softmax ids or level normalises over
    (genrec.id_softmax.softmax_groups); None: full-vocabulary log-probs.
    """

    name = "hf"
    concurrent = False

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        search: str = "auto",
        max_tree_tokens: int = 1024,
        cuda_graphs: bool = False,
        softmax_groups: Sequence[Sequence[str]] | None = None,
    ) -> None:
        if search not in SEARCHES:
            raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")
        if softmax_groups is not None and getattr(model.config, "final_logit_softcapping", None):
            raise ValueError(
                f"model.id_softmax with groups needs a plain linear output head; {type(model).__name__} soft-caps logits"
            )
        self.softmax = group_softmax(softmax_groups, tokenizer)
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
        self.static = (
            StaticForward(self.model, capture=True)
            if cuda_graphs and self.device.type == "cuda" and self.search != "beam"
            else None
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def layout_policy(self) -> tuple[str, int] | None:
        """(search, max_tree_tokens) where tries may be ranked exactly (see `tree_layouts`); None: beam only."""
        return None if self.search == "beam" else (self.search, self.max_tree_tokens)

    def launch(
        self,
        prompts: Sequence[Sequence[int]],
        tries: Sequence[Trie | None],
        *,
        beam_width: int,
        layouts: Sequence[TreeLayout | None] | None = None,
    ) -> Callable[[], list[Ranked]]:
        """Top `beam_width` items per request, exact where the trie is small enough, else by beam search;
        `rank` (RankByLaunch) waits for them. `layouts`: the tries' `tree_layouts` under this engine's
        `layout_policy`, if already made (genrec.prep's workers make them); None where a trie goes to beam search,
        and a request with a layout needs no trie (None). The exact scoring is queued on the device here, and the
        returned call waits for it. A batch job launches its next batch before it reads this one (`Recommender.rank_stream`), so
        the device works while this process writes results and packs the next batch. Requests that go to beam
        search are ranked here, before returning (beam search reads the device at every ID level)."""
        if len(prompts) != len(tries) or (layouts is not None and len(layouts) != len(tries)):
            raise ValueError("one trie (and layout) per prompt")
        if layouts is None:
            policy = self.layout_policy
            found = tree_layouts(tries_at(tries, range(len(tries))), *policy) if policy is not None else {}
        else:
            found = {i: lay for i, lay in enumerate(layouts) if lay is not None}
        out: list[Ranked] = [Ranked([], []) for _ in prompts]
        tree = list(found)
        rest = [i for i in range(len(prompts)) if i not in found]
        self.ranked_by.update(exact=len(tree), beam=len(rest))
        with attention_kernels(self.device):
            scored = (
                TreeScorer(self.model, pad_id=self.pad_id, static=self.static, softmax=self.softmax).launch(
                    [prompts[i] for i in tree], [found[i] for i in tree], beam_width
                )
                if tree
                else None
            )
            if rest:
                ranked = constrained_beam_search(
                    HFStepModel(self.model, pad_id=self.pad_id, softmax=self.softmax),
                    [prompts[i] for i in rest],
                    tries_at(tries, rest),
                    beam_width=beam_width,
                )
                for i, r in zip(rest, ranked, strict=True):
                    out[i] = r

        def result() -> list[Ranked]:
            if scored is not None:
                for i, r in zip(tree, scored(), strict=True):
                    out[i] = r
            return out

        return result

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
        """Exact log P(continuation | prompt) for each continuation, one full forward each (the reference the
        searches are tested against). Under `softmax`, each token's log-softmax is over its group's columns of
        the model's own full logits."""
        out: list[float] = []
        p = list(prompt)
        for start in range(0, len(continuations), batch_size):
            chunk = [list(c) for c in continuations[start : start + batch_size]]
            width = len(p) + max(len(c) for c in chunk)
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            for i, c in enumerate(chunk):  # right padding: positions stay 0..n-1
                ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            with attention_kernels(self.device):
                logits = self.model(input_ids=ids.to(self.device)).logits.float().cpu()
            for i, c in enumerate(chunk):
                at = len(p) - 1
                out.append(sum(self._token_logp(logits[i, at + j], t) for j, t in enumerate(c)))
        return out

    def _token_logp(self, logits: torch.Tensor, token: int) -> float:
        """log P(token) from one position's full logits, over the vocabulary or (`softmax`) the token's group."""
        if self.softmax is None:
            return float(torch.log_softmax(logits, dim=-1)[token].double())
        group = self.softmax.groups[self.softmax.group_of_token(token)]
        logp = torch.log_softmax(logits[torch.from_numpy(group)], dim=-1)
        return float(logp[int(self.softmax.column[token])].double())
