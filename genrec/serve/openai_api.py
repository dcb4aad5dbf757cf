"""What the OpenAI-compatible completion routes do, as values or APIError (as vLLM's entrypoints serve):
check the model, parse the request into a query, rank it, encode the reply (one orjson body, or an SSE stream).
Knows nothing of routing; genrec.serve.app maps its errors to statuses."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from genrec.recommender import Recommendation
from genrec.serve import encode
from genrec.serve.protocol import (
    APIError,
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChunkChoice,
    CompletionRequest,
    Delta,
    Usage,
)
from genrec.serve.service import RecService, recommended_items


def format_text(recs: list[Recommendation]) -> str:
    if not recs:
        return "No items to recommend."
    return "\n".join(
        f"{k}. {r.title or r.item_id} (item {r.item_id}, score {r.score:.4f})" for k, r in enumerate(recs, 1)
    )


class OpenAIServing:
    """/v1/chat/completions and /v1/completions over a RecService."""

    def __init__(self, service: RecService) -> None:
        self.service = service
        self.clock = service.rec.clock  # CPU time by stage; the engine's stages are timed by the recommender

    def check_model(self, model: str, n: int) -> None:
        service = self.service
        if model != service.model_name:
            raise APIError(
                400,
                f"unknown model {model!r}; this server serves {service.model_name!r}",
                param="model",
                code="model_not_found",
            )
        if n != 1:
            raise APIError(400, f"n={n}: only n=1 is supported (use n_items for more items)", param="n")

    async def chat(self, req: ChatCompletionRequest) -> bytes | AsyncIterator[str]:
        """The reply's JSON body, or its SSE chunks when `stream` is set."""
        service, clock = self.service, self.clock
        self.check_model(req.model, req.n)
        user_msgs = [m for m in req.messages if m.role == "user"]
        text = user_msgs[-1].text() if user_msgs else ""
        with clock.stage("parse"):
            q = service.parse(req, text=text, user=req.user)
        recs = await service.recommend(q, req.template)
        with clock.stage("encode"):
            fmt = req.response_format.type if req.response_format else "text"
            content = json.dumps({"items": encode.recommended(recs)}) if fmt != "text" else format_text(recs)
            template = (
                service.template_info(q.template.name, q.template.hash, q.template.version)
                if q.template
                else None
            )
            if not req.stream:
                return encode.chat_completion(
                    model=req.model,
                    content=content,
                    recs=recs,
                    prompt_tokens=q.prompt_tokens,
                    completion_tokens=len(recs) * service.rec.ids.depth,
                    template=template,
                )
        usage = Usage(
            prompt_tokens=q.prompt_tokens,
            completion_tokens=len(recs) * service.rec.ids.depth,
        )
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        resp = ChatCompletionResponse(
            model=req.model,
            choices=[ChatChoice(message=AssistantMessage(content=content))],
            usage=usage,
            recommendations=recommended_items(recs),
            template=template,
        )
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return sse_chunks(resp, content, include_usage)

    async def completion(self, req: CompletionRequest) -> bytes:
        service = self.service
        self.check_model(req.model, req.n)
        prompt = req.prompt if isinstance(req.prompt, str) else "\n".join(req.prompt)
        if req.stream:
            raise APIError(400, "stream=true is supported on /v1/chat/completions only", param="stream")
        with self.clock.stage("parse"):
            q = service.parse(req, text=prompt, user=req.user)
        recs = await service.recommend(q, req.template)
        with self.clock.stage("encode"):
            return encode.completion(
                model=req.model,
                text=format_text(recs),
                recs=recs,
                prompt_tokens=q.prompt_tokens,
                completion_tokens=len(recs) * service.rec.ids.depth,
            )


async def sse_chunks(resp: ChatCompletionResponse, content: str, include_usage: bool) -> AsyncIterator[str]:
    """OpenAI chunk stream: role, one chunk per line of the reply, finish, optional usage, [DONE]."""

    def chunk(delta: Delta, finish: Any = None, usage: Usage | None = None, choices: bool = True) -> str:
        c = ChatCompletionChunk(
            id=resp.id,
            created=resp.created,
            model=resp.model,
            choices=[ChunkChoice(delta=delta, finish_reason=finish)] if choices else [],
            usage=usage,
        )
        return f"data: {c.model_dump_json(exclude_none=False)}\n\n"

    yield chunk(Delta(role="assistant", content=""))
    lines = content.split("\n")
    for k, line in enumerate(lines):
        yield chunk(Delta(content=line + ("\n" if k + 1 < len(lines) else "")))
    yield chunk(Delta(), finish="stop")
    if include_usage:
        yield chunk(Delta(), usage=resp.usage, choices=False)
    yield "data: [DONE]\n\n"
