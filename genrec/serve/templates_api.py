"""The prompt-template API (/v1/templates) and the editor page (/editor) over the run's TemplateStore.

Reads need whatever the rest of /v1 needs (an API key when keys are configured). Writes (save,
activate, rollback) and previews (they run template code, in genrec.templates.prompt_worker) need an admin key (`--admin-key LABEL=KEY`); the label is recorded as the
version's author. Saves are validated first (422 with line and column), atomic, and guarded by
`If-Match` (or `base_version`): an edit based on a version that is no longer active gets 412,
a save over an existing template with no precondition gets 428. Serving picks up a new active
version on the next request; requests already admitted finish with the version they started with.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from starlette.datastructures import Headers

from genrec.serve.protocol import (
    APIError,
    TemplateActivateRequest,
    TemplateDetail,
    TemplateDiff,
    TemplateHistory,
    TemplateList,
    TemplatePreview,
    TemplatePreviewRequest,
    TemplateSaveRequest,
    TemplateSummary,
    TemplateVersionInfo,
)
from genrec.serve.service import Query as RecQuery
from genrec.serve.service import RecService, recommended_items
from genrec.templates.prompt_store import (
    TemplateChecker,
    TemplateNotFound,
    TemplateVersion,
    VersionConflict,
    check_name,
)
from genrec.templates.prompts import TemplateProblem, parse_template

STATIC = Path(__file__).resolve().parent / "static"
EDITOR_FILES = {"editor.js": "text/javascript", "editor.css": "text/css"}


def bearer(request: Request) -> str | None:
    return bearer_token(request.headers)


def bearer_token(headers: Headers) -> str | None:
    """The key of an `Authorization: Bearer <key>` header (None without one)."""
    auth = headers.get("authorization", "")
    return auth[7:].strip() if auth.startswith("Bearer ") else None


class TemplateService:
    """What the template routes do, as values or APIError: the store's reads and writes with their errors mapped
    to statuses, version preconditions, admin checks and previews. Knows nothing of routing."""

    def __init__(self, service: RecService, *, admin_keys: dict[str, str]) -> None:
        self.service, self.rec, self.store = service, service.rec, service.rec.templates
        self.checker = TemplateChecker(self.rec.data, self.rec.builder_with)
        self.admin_keys = admin_keys

    def info(self, v: TemplateVersion, cls: Callable[..., Any] = TemplateVersionInfo, **extra: Any) -> Any:
        fields = {k: val for k, val in v.to_dict().items() if k != "source"}
        active = self.store.active(v.name).version
        trained = self.rec.trained_template.get("hash")
        return cls(**fields, active=v.version == active, matches_training=v.hash == trained, **extra)

    def admin(self, request: Request) -> str:
        """The label of the request's admin key, or the 401/403 that says why it may not edit."""
        if not self.admin_keys:
            raise APIError(
                403,
                "template editing is disabled on this server: start it with --admin-key LABEL=KEY",
                type="permission_error",
                code="editing_disabled",
            )
        key = bearer(request)
        if key is None:
            raise APIError(
                401, "an admin API key is required", type="authentication_error", code="invalid_api_key"
            )
        if key not in self.admin_keys:
            raise APIError(
                403, "this API key may not edit templates", type="permission_error", code="not_admin"
            )
        return self.admin_keys[key]

    def valid(self, name: str) -> str:
        """The name from the URL, checked before anything reads or locks with it."""
        return self.read(lambda: check_name(name))  # type: ignore[no-any-return]

    def base_version(self, name: str, if_match: str | None, body_version: int | None) -> int | None:
        """The version an edit is based on: from If-Match (an ETag we issued) or the body."""
        store = self.store
        if if_match is None:
            return body_version
        if if_match.strip() == "*":
            return store.active(name).version if store.exists(name) else None
        current = store.active(name) if store.exists(name) else None
        if current is not None and if_match.strip() == current.etag:
            return current.version
        raise APIError(
            412,
            f"If-Match {if_match} is not the active version of {name!r}"
            + (f" (now {current.etag}); reload and reapply your edit" if current else " (it does not exist)"),
            code="version_conflict",
            headers={"ETag": current.etag} if current else None,
        )

    @staticmethod
    async def write(fn: Callable[[], TemplateVersion]) -> TemplateVersion:
        try:
            return await asyncio.to_thread(fn)
        except VersionConflict as e:
            raise APIError(412, str(e), code="version_conflict", headers={"ETag": e.current.etag}) from None
        except TemplateNotFound as e:
            raise APIError(404, str(e), type="not_found_error", code="template_not_found") from None
        except TemplateProblem as e:
            raise APIError(
                422, str(e), param="text", code="template_error", line=e.line, column=e.column
            ) from None

    @staticmethod
    def read(fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except TemplateNotFound as e:
            raise APIError(404, str(e), type="not_found_error", code="template_not_found") from None
        except TemplateProblem as e:  # an invalid name
            raise APIError(400, str(e), param="name", code="invalid_name") from None

    # -- reads -----------------------------------------------------------------------------------
    def list(self) -> TemplateList:
        out = []
        for name in self.store.names():
            v, t = self.store.template(name)
            out.append(
                self.info(
                    v, TemplateSummary, description=t.description, is_default=name == self.rec.template_name
                )
            )
        return TemplateList(data=out, trained=self.rec.trained_template)

    def detail(self, name: str, version: int | None) -> tuple[TemplateVersion, TemplateDetail]:
        def load() -> tuple[TemplateVersion, TemplateDetail]:
            v, t = self.store.template(name, version)
            is_default = name == self.rec.template_name
            return v, self.info(
                v, TemplateDetail, description=t.description, is_default=is_default, text=t.text
            )

        return self.read(load)  # type: ignore[no-any-return]

    def history(self, name: str) -> TemplateHistory:
        store = self.store
        return self.read(  # type: ignore[no-any-return]
            lambda: TemplateHistory(
                name=name,
                active=store.active(name).version,
                versions=[self.info(v) for v in store.versions(name)],
                activations=store.activations(name),
            )
        )

    def diff(self, name: str, a: int, b: int | None) -> TemplateDiff:
        def load() -> TemplateDiff:
            to = b or self.store.active(name).version
            return TemplateDiff(
                **{"from": f"{name}@v{a}", "to": f"{name}@v{to}"}, diff=self.store.diff((name, a), (name, to))
            )

        return self.read(load)  # type: ignore[no-any-return]

    # -- writes ----------------------------------------------------------------------------------
    async def save(
        self, name: str, body: TemplateSaveRequest, *, author: str, if_match: str | None
    ) -> tuple[TemplateVersion, bool]:
        """The saved version and whether the template existed before (a new one: 201)."""
        self.valid(name)
        exists = self.read(lambda: self.store.exists(name))
        base = self.base_version(name, if_match, body.base_version)
        if exists and base is None:
            raise APIError(
                428,
                f"template {name!r} exists: send If-Match with the ETag you edited (or base_version)",
                code="precondition_required",
            )
        v = await self.write(
            lambda: self.store.save(
                name,
                body.text,
                author=author,
                message=body.message,
                base_version=base,
                activate=body.activate,
                check=self.checker,
            )
        )
        return v, exists

    async def activate(
        self, name: str, version: int, *, author: str, if_match: str | None
    ) -> TemplateVersion:
        self.valid(name)
        base = self.base_version(name, if_match, None) if if_match else None
        return await self.write(
            lambda: self.store.activate(name, version, by=author, base_version=base, check=self.checker)
        )

    async def rollback(self, name: str, *, author: str, if_match: str | None) -> TemplateVersion:
        self.valid(name)
        base = self.base_version(name, if_match, None) if if_match else None
        return await self.write(lambda: self.store.rollback(name, by=author, base_version=base))

    async def preview(self, name: str, body: TemplatePreviewRequest) -> TemplatePreview:
        """Render for a user (or history) and rank with that prompt; unsaved `text` is validated like a save.
        Runs template code, so the route needs an admin key; renders in the worker process (off the event
        loop, stopped when it overruns)."""
        service, r = self.service, self.rec
        self.valid(name)
        draft = None
        if body.text is not None:
            text = body.text
            try:
                draft = await asyncio.to_thread(lambda: parse_template(text, source=f"{name}@draft"))
            except TemplateProblem as e:
                raise APIError(
                    422, str(e), param="text", code="template_error", line=e.line, column=e.column
                ) from None
        user = body.user
        if user is None and body.history is None:
            user = r.data.users[self.checker.samples[0]]
        resolved = service.resolve_query(user=user, history=body.history)
        if draft is None and not self.read(lambda: self.store.exists(name)):
            raise APIError(
                404, f"template {name!r} not found", type="not_found_error", code="template_not_found"
            )
        q = RecQuery(history=resolved.history, user=user)
        await asyncio.to_thread(service.render, q, name, version=body.version, draft=draft, isolated=True)
        if draft is not None:
            meta = service.template_info(name, draft.hash)
        else:
            assert q.template is not None  # render pinned the saved version
            meta = service.template_info(name, q.template.hash, q.template.version)
        recs = []
        if body.n_items:
            q.options = r.cfg.ranking.with_(n_items=body.n_items)
            recs = await service.recommend(q)
        if not recs:
            q.prompt_tokens = len(await asyncio.to_thread(r.engine.encode_messages, q.messages or []))
        return TemplatePreview(
            template=meta,
            user=user,
            messages=q.messages or [],
            prompt_tokens=q.prompt_tokens,
            recommendations=recommended_items(recs),
        )


def template_router(service: RecService, *, admin_keys: dict[str, str]) -> APIRouter:
    """Routes for templates over a TemplateService; `admin_keys` maps key -> label (the author recorded on
    writes)."""
    t = TemplateService(service, admin_keys=admin_keys)
    router = APIRouter()

    def with_etag(model: Any, v: TemplateVersion, status: int = 200) -> JSONResponse:
        return JSONResponse(model.model_dump(by_alias=True), status_code=status, headers={"ETag": v.etag})

    @router.get("/v1/templates")
    async def list_templates() -> TemplateList:
        return t.list()

    @router.get("/v1/templates/{name}")
    async def get_template(name: str, version: int | None = Query(None, ge=1)) -> JSONResponse:
        v, detail = t.detail(name, version)
        return with_etag(detail, v)

    @router.get("/v1/templates/{name}/versions")
    async def history(name: str) -> TemplateHistory:
        return t.history(name)

    @router.get("/v1/templates/{name}/diff")
    async def diff(
        name: str, a: int = Query(alias="from", ge=1), b: int | None = Query(None, alias="to", ge=1)
    ) -> TemplateDiff:
        return t.diff(name, a, b)

    @router.put("/v1/templates/{name}")
    async def save(
        name: str, body: TemplateSaveRequest, request: Request, if_match: str | None = Header(None)
    ) -> JSONResponse:
        v, existed = await t.save(name, body, author=t.admin(request), if_match=if_match)
        return with_etag(t.info(v), v, 200 if existed else 201)

    @router.post("/v1/templates/{name}/activate")
    async def activate(
        name: str, body: TemplateActivateRequest, request: Request, if_match: str | None = Header(None)
    ) -> JSONResponse:
        v = await t.activate(name, body.version, author=t.admin(request), if_match=if_match)
        return with_etag(t.info(v), v)

    @router.post("/v1/templates/{name}/rollback")
    async def rollback(name: str, request: Request, if_match: str | None = Header(None)) -> JSONResponse:
        v = await t.rollback(name, author=t.admin(request), if_match=if_match)
        return with_etag(t.info(v), v)

    @router.post("/v1/templates/{name}/preview")
    async def preview(name: str, body: TemplatePreviewRequest, request: Request) -> TemplatePreview:
        t.admin(request)
        return await t.preview(name, body)

    @router.get("/editor", response_class=HTMLResponse)
    async def editor() -> HTMLResponse:
        return HTMLResponse(
            (STATIC / "editor.html").read_text(encoding="utf-8"),
            headers={
                "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                "connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff",
            },
        )

    @router.get("/editor/{asset}")
    async def editor_asset(asset: str) -> FileResponse:
        if asset not in EDITOR_FILES:  # a fixed list: no path ever comes from the URL
            raise APIError(404, f"no editor asset {asset!r}", type="not_found_error")
        return FileResponse(STATIC / asset, media_type=EDITOR_FILES[asset])

    return router
