"""The HTTP surface: thin OpenAI-compatible routes over OpenAIServing and RecService, one place mapping errors to
statuses.

Routes: GET /v1/models, POST /v1/chat/completions (JSON or SSE stream), POST /v1/completions,
GET /health, GET /metrics (Prometheus), the template API and /editor (genrec.serve.templates_api). Bearer API keys when configured. Every client input error
is a 4xx OpenAI-style error body; nothing a client sends yields a 5xx. The two completion routes, the hot path,
are served by a pure ASGI layer (`FastRoutes`) that answers as their FastAPI routes do, without FastAPI's
per-request machinery.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from genrec.errors import GenrecError
from genrec.serve import encode
from genrec.serve.http import ASGIApp, BodyLimit, HTTPLimits, Message, Receive, Scope, Send, replaying
from genrec.serve.openai_api import OpenAIServing
from genrec.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from genrec.serve.service import Metrics, RecService
from genrec.serve.templates_api import bearer_token, template_router

logger = logging.getLogger(__name__)


PUBLIC_CHOICES = {
    "metrics": ("/metrics",),
    "docs": ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"),
}
"""What `public` may open to clients without a key when keys are configured (`/health` always is)."""


def error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def invalid_body(errors: Sequence[Mapping[str, Any]]) -> APIError:
    """The 400 of a request body that failed validation, from FastAPI's or pydantic's error list: malformed
    JSON, or the first error naming its field (`messages.0.role: ...`)."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return APIError(400, "malformed JSON body", code="invalid_json")
    param = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
    msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    return APIError(400, f"{param}: {msg}" if param else msg, param=param)


@dataclass(frozen=True)
class FastRoute:
    """A POST route served by `FastRoutes`: the model its JSON body is validated into, what answers it, and
    the FastAPI route of the same path (the metrics' label, the OpenAPI schema)."""

    model: type[BaseModel]
    respond: Callable[[Any], Awaitable[Response]]
    route: Any


class FastRoutes:
    """Pure ASGI fast path for the completion routes (POST /v1/chat/completions, /v1/completions), the hot path
    of a server under load: the JSON body parsed and validated into the same pydantic model and answered by the
    same function as the FastAPI route, without FastAPI's request machinery (its Request object, dependency
    solving, the route's exception handling), which costs the event loop more than genrec's own work on a
    request (bench.serve_cpu's `asgi_stack`). Errors are those the FastAPI route gives: a malformed body is a
    400 `invalid_json`, a failed field the same 400 naming it (`invalid_body`). A request this path does not
    take as it is — another method or path, an empty body, a Content-Type other than JSON — goes on to the
    FastAPI app with its body, and is answered exactly as before. (JSON nested past the interpreter's recursion
    limit is refused by both with the same 400, at depths that differ by their stacks' depth: about 960 levels.)"""

    def __init__(self, app: ASGIApp, *, routes: Mapping[str, FastRoute]) -> None:
        self.app, self.routes = app, dict(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = (
            self.routes.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        )
        if route is None:
            await self.app(scope, receive, send)
            return
        body, receive = await read_body(receive)
        if not body or not is_json(Headers(scope=scope).get("content-type", "")):
            await self.app(scope, receive, send)
            return
        scope["route"] = route.route  # what the FastAPI router would set: Observe labels metrics by it
        response = await self._answer(route, body)
        await response(scope, receive, send)

    @staticmethod
    async def _answer(route: FastRoute, body: bytes) -> Response:
        try:
            data = json.loads(body)  # as FastAPI parses a JSON body (not orjson: the same numbers and errors)
        except json.JSONDecodeError:
            return error(APIError(400, "malformed JSON body", code="invalid_json"))
        except Exception:  # not UTF-8, nested past the recursion limit: FastAPI's answer to either
            return error(APIError(400, "There was an error parsing the body"))
        if data is None:  # a `null` body: FastAPI takes it for a missing one
            return error(invalid_body([{"type": "missing", "loc": ("body",), "msg": "Field required"}]))
        try:
            # as FastAPI validates a body (from_attributes: its wording for a body that is not an object)
            request = route.model.model_validate(data, from_attributes=True)
        except ValidationError as e:
            return error(invalid_body(e.errors()))
        return await route.respond(request)


async def read_body(receive: Receive) -> tuple[bytes, Receive]:
    """The request's whole body (BodyLimit has bounded its size and time), and a `receive` that gives it again
    to whoever reads the request next, then what the client sends after it (its disconnect)."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away before its body was in
            chunks.clear()
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    return body, replaying(body, receive)


_PARAMS = re.compile(r"\s*;\s*")


def is_json(content_type: str) -> bool:
    """`application/json` or `application/<anything>+json`: the Content-Types FastAPI parses a body of as JSON, read
    as it reads them (`email.message`'s rules: parameters after `;` and case ignored, a value without exactly one `/`
    is text/plain)."""
    kind = _PARAMS.split(content_type)[0].lower().strip()
    if kind.count("/") != 1:
        return False
    main, sub = kind.split("/")
    return main == "application" and (sub == "json" or sub.endswith("+json"))


class Observe:
    """Pure ASGI middleware (no BaseHTTPMiddleware: it adds a task and a copy of the response per request)
    around the routes: a protected path (`protected_paths`) without a valid API key gets 401 before routing;
    an APIError or other exception a route lets through becomes its OpenAI-style error (500 for the others,
    logged); each /v1 request is counted and timed by route and status (`Metrics.requests`, `latency`), as
    the response starts."""

    def __init__(
        self, app: ASGIApp, *, metrics: Metrics, keys: set[str], exact: set[str], prefixes: tuple[str, ...]
    ) -> None:
        self.app, self.metrics = app, metrics
        self.keys, self.exact, self.prefixes = keys, exact, prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path: str = scope["path"]
        protected = self.keys and (path in self.exact or path.startswith(self.prefixes))
        if protected and bearer_token(Headers(scope=scope)) not in self.keys:
            self.metrics.requests.labels("unauthenticated", "401").inc()  # before routing: no route yet
            await error(
                APIError(
                    401,
                    "missing or invalid API key (Authorization: Bearer …)",
                    type="authentication_error",
                    code="invalid_api_key",
                )
            )(scope, receive, send)
            return
        counted = path.startswith(self.prefixes)
        responded = False

        async def observed(message: Message) -> None:
            nonlocal responded
            if message["type"] == "http.response.start" and not responded:
                responded = True
                if counted:
                    # labelled by route, not by the path a client sent: one series per route, however many names
                    endpoint = getattr(scope.get("route"), "path", None) or "unmatched"
                    self.metrics.requests.labels(endpoint, str(message["status"])).inc()
                    self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
            await send(message)

        try:
            await self.app(scope, receive, observed)
        except Exception as e:
            if responded:  # too late for an error body: the server closes the connection
                raise
            if not isinstance(e, APIError):
                logger.exception("unhandled error on %s", path)
                e = APIError(500, "internal error", type="server_error")
            await error(e)(scope, receive, observed)


def protected_paths(public: Collection[str]) -> tuple[set[str], tuple[str, ...]]:
    """Exact paths and path prefixes that need an API key when keys are configured."""
    unknown = sorted(set(public) - set(PUBLIC_CHOICES))
    if unknown:
        raise ValueError(f"public: unknown choice(s) {unknown}; choose from {sorted(PUBLIC_CHOICES)}")
    exact = {p for choice, paths in PUBLIC_CHOICES.items() if choice not in public for p in paths}
    return exact, ("/v1/",)


def create_app(
    service: RecService,
    *,
    api_keys: list[str] | None = None,
    admin_keys: dict[str, str] | None = None,
    on_shutdown: Callable[[], None] | None = None,
    http: HTTPLimits | None = None,
    public: Collection[str] = (),
    fast_routes: bool = True,
) -> FastAPI:
    """The app; `admin_keys` (key -> label) may also edit templates, and count as API keys;
    `on_shutdown` runs after in-flight requests drained (the server stops its engine there); `http`: body
    size and read deadline; `public`: `metrics` and/or `docs` served without a key when keys are configured
    (by default they need one, like /v1); `fast_routes`: the completion routes served by `FastRoutes` (False:
    by FastAPI alone, as before issue 26; the tests and benchmarks compare the two)."""
    admins = dict(admin_keys or {})
    serving = OpenAIServing(service)
    keys = set(api_keys or []) | (set(admins) if api_keys else set())
    exact, prefixes = protected_paths(public)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        yield
        await service.stop()
        if on_shutdown is not None:
            on_shutdown()

    app = FastAPI(title="genrec", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error(invalid_body(exc.errors()))

    @app.exception_handler(GenrecError)
    async def on_genrec_error(request: Request, exc: GenrecError) -> JSONResponse:
        # routes map the errors they expect; any other project error is still about the request's input
        return error(APIError(400, str(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error(APIError(exc.status_code, str(exc.detail), type=kind))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": service.model_name, "queue": service.queue_depth}

    @app.get("/metrics")
    async def metrics() -> Response:
        # in a thread: a front-end's collectors ask the engine core over a pipe (up to 2 s when it is busy)
        body = await asyncio.to_thread(generate_latest, service.metrics.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=service.model_name)])

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(req: ChatCompletionRequest) -> Response:
        try:
            out = await serving.chat(req)
        except (APIError, GenrecError) as e:
            return error(e if isinstance(e, APIError) else APIError(400, str(e)))
        if isinstance(out, bytes):
            return Response(out, media_type=encode.JSON)
        return StreamingResponse(out, media_type="text/event-stream")

    @app.post("/v1/completions", response_model=None)
    async def completions(req: CompletionRequest) -> Response:
        try:
            return Response(await serving.completion(req), media_type=encode.JSON)
        except (APIError, GenrecError) as e:
            return error(e if isinstance(e, APIError) else APIError(400, str(e)))

    app.include_router(template_router(service, admin_keys=admins))
    by_path = {getattr(r, "path", None): r for r in app.routes}
    fast = {
        "/v1/chat/completions": FastRoute(ChatCompletionRequest, chat, by_path["/v1/chat/completions"]),
        "/v1/completions": FastRoute(CompletionRequest, completions, by_path["/v1/completions"]),
    }
    if fast_routes:  # added first: the innermost layer, behind auth and metrics
        app.add_middleware(FastRoutes, routes=fast)
    app.add_middleware(Observe, metrics=service.metrics, keys=keys, exact=exact, prefixes=prefixes)
    app.add_middleware(BodyLimit, limits=http or HTTPLimits())  # added last: the outermost layer
    return app
