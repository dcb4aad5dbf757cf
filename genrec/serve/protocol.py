"""OpenAI-compatible request, response and error schemas: the server's whole wire format.

Recommendation options are extra fields (`n_items`, `candidates`, `n_candidates`, `exclude`,
`explore`, `template`, `history`), sent by the official client through `extra_body`, so plain
OpenAI clients keep working. Unknown fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from genrec.config import CandidateMode, RankingOptions


class ErrorInfo(BaseModel):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    line: int | None = None
    """Template errors: the 1-based line (and column) in the template file."""
    column: int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class APIError(Exception):
    """Raised by handlers; the app turns it into an ErrorResponse with this HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        line: int | None = None,
        column: int | None = None,
    ) -> None:
        message = message.encode("utf-8", "backslashreplace").decode()  # may quote a client's bad text
        super().__init__(message)
        if param is not None:
            param = param.encode("utf-8", "backslashreplace").decode()
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}
        self.line, self.column = line, column

    def body(self) -> dict[str, Any]:
        info = ErrorInfo(
            message=self.message,
            type=self.type,
            param=self.param,
            code=self.code,
            line=self.line,
            column=self.column,
        )
        body = ErrorResponse(error=info).model_dump()
        for key in ("line", "column"):  # OpenAI's four fields always; template positions when known
            if body["error"][key] is None:
                del body["error"][key]
        return body


def text_problem(value: Any, where: str = "body") -> str | None:
    """Where a request's raw JSON holds text that is not valid Unicode, or None.

    JSON may carry lone surrogates (`"\\ud800"`): Python keeps them in a str, and they fail later, deep in
    the tokenizer, the text encoder or a template file's encoding. Checked once here, on the decoded body,
    so no free text reaches them unchecked whichever field it came in."""
    stack: list[tuple[Any, tuple[Any, ...]]] = [(value, ())]
    while stack:  # not recursive: a body may nest deeper than Python's recursion limit
        node, path = stack.pop()
        if isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError as e:
                at = ".".join(str(k).encode("utf-8", "backslashreplace").decode() for k in path) or where
                return f"{at}: text is not valid Unicode (a lone surrogate at character {e.start})"
        elif isinstance(node, dict):
            for key, item in node.items():
                stack += [(item, (*path, key)), (key, path)]
        elif isinstance(node, list):
            stack += [(item, (*path, k)) for k, item in enumerate(node)]
    return None


class Request(BaseModel):
    """A request body: its text must be valid Unicode (see text_problem)."""

    @model_validator(mode="before")
    @classmethod
    def _valid_text(cls, data: Any) -> Any:
        problem = text_problem(data)
        if problem:
            raise ValueError(problem)
        return data


MAX_ITEMS = 200
"""The most items one response carries (a request's n_items)."""


class RecommendationOptions(Request):
    """genrec's extra request fields (all optional). The ranking fields left out take the run's defaults
    (RunConfig.ranking: the candidates its evaluation ranked); RecService.ranking makes them RankingOptions."""

    model_config = ConfigDict(extra="ignore")

    n_items: int | None = Field(None, ge=1, le=MAX_ITEMS, description="Items to return (default 10).")
    candidates: CandidateMode | None = Field(
        None,
        description="`retriever`: the top n_candidates of the run's retriever; `all`: the whole catalogue "
        "(default: the run's eval.candidates).",
    )
    n_candidates: int | None = Field(
        None,
        ge=1,
        le=RankingOptions.MAX_CANDIDATES,
        description="Retrieved candidates per request (default: the run's eval.n_candidates).",
    )
    exclude: list[str] = Field(default_factory=list, description="Item ids/titles never to return.")
    explore: float = Field(
        0.0, ge=0.0, le=1.0, description="0 = pure model ranking; >0 trades score for diversity (MMR)."
    )
    template: str | None = Field(None, description="Prompt template name (default: the run's).")
    history: list[str] | None = Field(
        None, description="The user's items, oldest first (ids, ID strings or titles)."
    )


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str = "text"
    text: str = ""


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content if p.type == "text")


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: dict[str, Any] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatCompletionRequest(RecommendationOptions):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None


class CompletionRequest(RecommendationOptions):
    model: str
    prompt: str | list[str]
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None


class RecommendedItem(BaseModel):
    rank: int
    item_id: str
    title: str
    score: float


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"] = "stop"
    logprobs: None = None


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: _id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    recommendations: list[RecommendedItem]
    template: dict[str, Any] | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop"] | None = "stop"
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: _id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    recommendations: list[RecommendedItem] | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "genrec"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- prompt templates (the /v1/templates API and the /editor page) -------------------------------
class TemplateVersionInfo(BaseModel):
    name: str
    version: int
    hash: str
    etag: str
    author: str
    created: str
    message: str
    parent: int | None = None
    active: bool = False
    matches_training: bool = Field(description="Same text (hash) as the template the model was trained with.")
    checked: bool = Field(
        False,
        description="Passed the render check against the run's sample users when saved (or is a shipped file): "
        "served on the sandbox's fast path.",
    )


class TemplateSummary(TemplateVersionInfo):
    description: str = ""
    is_default: bool = Field(False, description="The run's template: what requests without `template` use.")


class TemplateList(BaseModel):
    object: Literal["list"] = "list"
    data: list[TemplateSummary]
    trained: dict[str, Any] = Field(
        default_factory=dict, description="Name and hash the model was trained with."
    )


class TemplateDetail(TemplateSummary):
    text: str


class TemplateHistory(BaseModel):
    name: str
    active: int
    versions: list[TemplateVersionInfo]
    activations: list[dict[str, Any]]


class TemplateSaveRequest(Request):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(max_length=65_536, description="The whole file: front matter and body.")
    message: str = Field("", max_length=500, description="What changed and why (like a commit message).")
    activate: bool = Field(True, description="Serve the new version at once.")
    base_version: int | None = Field(
        None, description="The active version the edit started from (or send its ETag as If-Match)."
    )


class TemplateActivateRequest(Request):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=1)


class TemplatePreviewRequest(Request):
    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(
        None, max_length=65_536, description="Unsaved text to preview (else a saved version)."
    )
    version: int | None = Field(None, ge=1, description="Saved version to preview (default: the active one).")
    user: str | None = Field(
        None, max_length=200, description="A user of the run's data (default: a sample user)."
    )
    history: list[str] | None = Field(
        None, max_length=512, description="Items instead of a user, oldest first."
    )
    n_items: int = Field(
        10, ge=0, le=50, description="Recommendations to compute with this prompt (0: none)."
    )


class TemplatePreview(BaseModel):
    template: dict[str, Any]
    user: str | None
    messages: list[dict[str, str]]
    prompt_tokens: int
    recommendations: list[RecommendedItem]


class TemplateDiff(BaseModel):
    from_: str = Field(alias="from")
    to: str
    diff: str
