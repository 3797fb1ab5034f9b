"""`tinylm serve`: an OpenAI-compatible completions server (FastAPI on uvicorn, server-sent events for streams) and
the playground page, over one continuous batch per model.

Each model's continuous batch runs in a process of its own (infer/worker.py: BatchProcess); the event loop only
parses, queues and forwards events, so it never waits on a model, nor holds one up. Requests are bounded (body size,
prompt, n, max_tokens by the context, the queue: 429 with Retry-After when full); a client that leaves mid-stream
cancels its rows, which free their slots within a step or two.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from tinylm.infer.completions import CompletionRun, Mailbox
from tinylm.infer.openai_api import ApiError, Limits, ServedModel, parse_completion
from tinylm.infer.worker import BatchProcess

OPEN_PATHS = {"/", "/health", "/playground.html"}  # the page and the health check need no key


def create_app(models: list[ServedModel], api_key: str | None = None, limits: Limits = Limits(),
               fast: bool = True, compiled: str | None = None) -> FastAPI:
    """The server's ASGI app over these loaded models (names must differ). Workers start with the app's lifespan and
    decode with the compiled step in `compiled`'s dtype where it can run (models/compiled.py), else eagerly."""
    by_name = {m.name: m for m in models}
    if len(by_name) != len(models):
        raise ValueError("two models have the same name")
    workers: dict[str, BatchProcess] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for served in models:
            workers[served.name] = BatchProcess(served.model, fast, max_rows=limits.max_batch,
                                                name=f"tinylm-{served.name}", compiled=compiled)
        yield
        cancel_all(app)
        for worker in workers.values():
            worker.stop(timeout=10)

    app = FastAPI(title="tinylm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.workers = workers
    app.state.mailbox = None  # made on the serving loop by its first request

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    if api_key is not None:
        app.add_middleware(BearerKey, key=api_key)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": list(by_name), "auth": api_key is not None,
                "busy": {name: w.live() for name, w in workers.items()}}

    _add_api(app, models, workers, limits)
    _add_page(app)
    return app


def _add_api(app: FastAPI, models: list[ServedModel], workers: dict[str, BatchProcess], limits: Limits) -> None:
    by_name = {m.name: m for m in models}

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [m.card() for m in models]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        raise ApiError(400, "tinylm serves story models, not chat models: they continue text. Use /v1/completions "
                            "with the opening of a story as the prompt", code="unsupported_endpoint")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _read_json(request, limits.max_body_bytes)
        completion = parse_completion(body, by_name, limits)
        worker = workers[completion.model.name]
        if worker.waiting() + completion.rows > limits.max_queue:
            raise ApiError(429, f"model {completion.model.name} has {limits.max_queue} rows waiting: retry shortly",
                           code="queue_full", headers={"Retry-After": "1"})
        if app.state.mailbox is None:
            app.state.mailbox = Mailbox(asyncio.get_running_loop())
        run = CompletionRun(completion, app.state.mailbox)
        for group in run.groups():
            worker.submit(group)
        if completion.stream:
            return StreamingResponse(run.sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        response = await run.collect(request.is_disconnected)
        if run.error is not None:
            raise ApiError(500, f"generation failed: {run.error}", code="server_error")
        return response


def _add_page(app: FastAPI) -> None:
    @app.get("/", response_class=HTMLResponse)
    async def playground() -> HTMLResponse:
        page = resources.files("tinylm.infer").joinpath("playground.html").read_text(encoding="utf-8")
        return HTMLResponse(page)

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def unknown(path: str) -> Response:
        raise ApiError(404, f"no route /{path:.100}: this server answers /v1/models, /v1/completions, /health and /",
                       code="not_found")


class BearerKey:
    """Every request but the page and the health check needs `Authorization: Bearer KEY`. Plain ASGI: Starlette's
    BaseHTTPMiddleware would pass each streamed chunk through one more task and queue."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                error = ApiError(401, "Incorrect API key provided: pass it as 'Authorization: Bearer KEY'",
                                 code="invalid_api_key")
                await JSONResponse(error.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def cancel_all(app: FastAPI) -> None:
    """Cancel every row in flight or waiting: each stream ends with a last chunk and [DONE] (a clean shutdown)."""
    for worker in app.state.workers.values():
        for row in worker.in_flight():
            row.cancel()


async def _read_json(request: Request, limit: int):
    """The body as JSON, refused with 413 beyond `limit` bytes (counted as it arrives) and 400 when malformed."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is over {limit} bytes", code="body_too_large")
    data = bytearray()
    async for piece in request.stream():
        data += piece
        if len(data) > limit:
            raise ApiError(413, f"the request body is over {limit} bytes", code="body_too_large")
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None
