"""Response bodies as JSON bytes: plain dicts serialised by orjson, with no pydantic model built or validated
and no `jsonable_encoder` walk (FastAPI's path for a returned model cost about 500 µs a chat reply, this about
20 µs: bench/serve_cpu.py). genrec.serve.protocol's models stay the schema: tests validate these bodies against them.
Knows nothing of HTTP; genrec.serve.app wraps the bytes in a response.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

import orjson

from genrec.recommender import Recommendation

JSON = "application/json"


def recommended(recs: Sequence[Recommendation]) -> list[dict[str, Any]]:
    """The wire form of a ranked list (genrec.serve.protocol.RecommendedItem): rank from 1, scores rounded."""
    return [
        {"rank": k, "item_id": r.item_id, "title": r.title, "score": round(r.score, 6)}
        for k, r in enumerate(recs, 1)
    ]


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_completion(
    *,
    model: str,
    content: str,
    recs: Sequence[Recommendation],
    prompt_tokens: int,
    completion_tokens: int,
    template: dict[str, Any] | None,
) -> bytes:
    """A genrec.serve.protocol.ChatCompletionResponse body."""
    return orjson.dumps(
        {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": _usage(prompt_tokens, completion_tokens),
            "recommendations": recommended(recs),
            "template": template,
        }
    )


def completion(
    *, model: str, text: str, recs: Sequence[Recommendation], prompt_tokens: int, completion_tokens: int
) -> bytes:
    """A genrec.serve.protocol.CompletionResponse body."""
    return orjson.dumps(
        {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
            "usage": _usage(prompt_tokens, completion_tokens),
            "recommendations": recommended(recs),
        }
    )
