"""The FastAPI application: routes, JSON errors, bearer token, body limit, request counting.

    POST /v1/images/generations   OpenAI images API shape + DeLeaker fields (schema.py)
    GET  /v1/models               the one model served (OpenAI's models.list / models.retrieve)
    GET  /health                  200 {"status": "ready"} after warm-up; 503 while warming up or draining
    GET  /metrics                 Prometheus text
    GET  /                        the playground page (static/; open without a token, its API calls send one)

Every failure is a JSON body {"error": {"message", "type", "param", "code"}} (the OpenAI shape):
400 invalid request (param names the field), 401 bad/missing token, 408 body not received in
time, 413 body too large,
429 queue full (Retry-After), 503 warming up / shutting down, 504 timed out, 500 internal error.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batcher import Draining, QueueFull
from .client import GENERATE_PATH
from ..errors import FieldError
from ..request import api_field
from .engine import SETTING_KINDS, ClientGone, Engine, RequestTimeout
from .logs import REQUEST_ID_HEADER, log_access, request_id
from .schema import IGNORED_HEADER, ImageData, ImageGenerationRequest, ImageGenerationResponse, error_body

log = logging.getLogger("deleaker.serve")

TOKEN_ENV = "DELEAKER_API_TOKEN"
STATIC_DIR = Path(__file__).with_name("static")
# open without a token: the health probe, and the playground's static files (it holds no data)
OPEN_PATHS, OPEN_PREFIX = ("/health", "/"), "/static/"
# status -> (error code in the body, metrics kind); 499: the client closed the connection first
# a request is an object holding lists and one object of settings: 2 levels; anything much deeper is
# not a request, and stays away from the validator's recursion
MAX_BODY_DEPTH = 8
_KINDS = {400: "invalid_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
          408: "request_timeout", 413: "body_too_large", 429: "queue_full", 499: "client_disconnected",
          500: "internal_error", 503: "unavailable", 504: "timeout"}


def _bearer_ok(authorization: str, token: str) -> bool:
    """`Authorization: Bearer <token>`; the scheme is case-insensitive (RFC 9110)."""
    scheme, _, given = authorization.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def _error(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, param, _KINDS.get(status, "error")), status_code=status, headers=headers)


async def _receive_by(receive, deadline: float):
    """receive() before the event loop's time reaches deadline, else asyncio.TimeoutError."""
    if hasattr(asyncio, "timeout_at"):  # Python 3.11+: one timer, where wait_for makes a task per read
        async with asyncio.timeout_at(deadline):
            return await receive()
    return await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())


class _Guard:
    """Pure ASGI middleware at the edge: bearer token, body size limit, body read timeout, counting
    of answers, and the access log (one line per request, its id in X-Request-Id; logs.py). Runs
    before any route reads the body, so an unauthorized client learns nothing about the API."""

    def __init__(self, app, engine: Engine, token: str | None):
        self.app, self.engine, self.token = app, engine, token
        self.max_body = engine.options.max_body_bytes
        self.read_timeout_s = engine.options.read_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        path = scope["path"]
        status_seen = {}
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), None)
        rid = request_id(given)
        state = scope.setdefault("state", {})  # request.state of the route: it sets "images"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status_seen["status"] = message["status"]
                message = {**message, "headers": [*message.get("headers", ()),
                                                  (REQUEST_ID_HEADER.lower().encode(), rid.encode())]}
            await send(message)

        try:
            await self._guarded(scope, receive, counting_send, path)
        finally:
            status = status_seen.get("status")
            if path == GENERATE_PATH and status is not None:
                m = self.engine.metrics
                m.requests.labels(str(status)).inc()
                if status >= 400:
                    m.errors.labels(_KINDS.get(status, str(status))).inc()
            # no status: the connection ended before an answer (logged as 499, nginx's "client closed")
            log_access(scope.get("method", ""), path, status if status is not None else 499,
                       (time.perf_counter() - t0) * 1000, state.get("images", 0), rid)

    async def _guarded(self, scope, receive, send, path):
        authorization, length = "", None
        for k, v in scope["headers"]:  # ASGI header names are lower-case
            if k == b"authorization":
                authorization = v.decode("latin-1")
            elif k == b"content-length":
                length = v.decode("latin-1")
        if self.token is not None and path not in OPEN_PATHS and not path.startswith(OPEN_PREFIX):
            if not _bearer_ok(authorization, self.token):
                return await _error(401, "missing or wrong bearer token (Authorization: Bearer ...)",
                                    headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await _error(413, f"request body is over this server's limit of {self.max_body} bytes",
                                "body")(scope, receive, send)
        seen, body_done = 0, False
        deadline = asyncio.get_running_loop().time() + self.read_timeout_s

        async def limited_receive():
            nonlocal seen, body_done
            if body_done:  # after the body: waiting for a disconnect, which has no deadline
                return await receive()
            try:
                message = await _receive_by(receive, deadline)
            except asyncio.TimeoutError:
                raise StarletteHTTPException(408, f"the request body did not arrive within "
                                                  f"{self.read_timeout_s:g}s", headers={"Connection": "close"}
                                             ) from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:  # chunked bodies carry no Content-Length
                    raise StarletteHTTPException(413, f"request body is over this server's limit of "
                                                      f"{self.max_body} bytes")
            return message

        await self.app(scope, limited_receive, send)


# pydantic's error types -> what the value must be, in plain words (by type, never by message text)
_MUST_BE = {"float_type": "a number", "float_parsing": "a number", "int_type": "a whole number",
            "int_parsing": "a whole number", "int_from_float": "a whole number", "bool_type": "true or false",
            "bool_parsing": "true or false", "string_type": "a string", "list_type": "a list",
            "dict_type": "an object"}


def _validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """Pydantic's first error -> (one-line message, the field it is about)."""
    err = errors[0]
    loc = [str(x) for x in err.get("loc", ())]
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return f"unknown field {'.'.join(loc)!r}", loc[0] if loc else None
    if not loc and kind in ("missing", "model_type", "model_attributes_type", "dict_type"):
        return "the body must be a JSON object", "body"
    field = ".".join(loc) or "body"
    if kind == "missing":
        return f"{field} is required", loc[0]
    if kind in _MUST_BE:
        value = err.get("input")
        return f"{field} must be {_MUST_BE[kind]}, got {json.dumps(value)[:80]}", (loc[0] if loc else "body")
    return f"{field}: {err.get('msg')}", (loc[0] if loc else "body")


def _json_media(content_type: str | None) -> bool:
    """No Content-Type, application/json or application/*+json: a JSON body (FastAPI's rule)."""
    if not content_type:
        return True
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def parse_body(raw: bytes, content_type: str | None) -> ImageGenerationRequest:
    """A generation request's body -> ImageGenerationRequest; FieldError (400) naming the bad field."""
    if not _json_media(content_type):
        raise FieldError("send the body as JSON with Content-Type: application/json", "body")
    if not raw:
        raise FieldError("the body must be a JSON object", "body")
    try:
        data = json.loads(raw)
    except RecursionError:  # nested past the parser's limit (thousands of levels)
        raise FieldError(f"the JSON body nests too deep; a request nests at most {MAX_BODY_DEPTH} levels",
                         "body") from None
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
        raise FieldError(f"malformed JSON body: {getattr(e, 'msg', e)}", "body") from None
    depth = json_depth(data)
    if depth > MAX_BODY_DEPTH:
        raise FieldError(f"the JSON body nests {depth} levels deep; a request nests at most {MAX_BODY_DEPTH}", "body")
    try:
        return ImageGenerationRequest.model_validate(data)
    except ValidationError as e:
        message, param = _validation_message(e.errors())
        raise FieldError(message, param) from None
    except (ValueError, TypeError, RecursionError) as e:  # anything else the validator meets is the body's fault
        raise FieldError(f"the body cannot be read as a request: {type(e).__name__}", "body") from None


def json_depth(value) -> int:
    """How deep the lists and dicts of a parsed JSON value nest (0 for a scalar), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (list, dict)):
            deepest = max(deepest, d)
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


async def _client_gone(request: Request) -> None:
    """Returns when the client closes its connection (the body has been read by then)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _model_card(engine: Engine) -> dict:
    # OpenAI's model object, and under "deleaker" the card: example prompt, words, sizes, defaults
    return {"id": engine.model_id, "object": "model", "created": engine.started, "owned_by": "deleaker",
            "deleaker": engine.model_card()}


def create_app(engine: Engine, token: str | None = None, lifespan=None) -> FastAPI:
    """The HTTP app over one engine. token: required bearer token (None: no auth)."""
    app = FastAPI(title="deleaker", summary="DeLeaker text-to-image generation", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_Guard, engine=engine, token=token)
    m = engine.metrics

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), "body" if exc.status_code == 413 else None,
                      headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(_, exc: Exception):
        log.exception("internal error")
        return _error(500, f"internal error: {type(exc).__name__}")

    @app.get("/health")
    async def health():
        info = engine.pipe.backend.info
        status = "draining" if engine.draining else "ready" if engine.ready else "warming_up"
        body = {"status": status, "model": engine.model_id, "backend": engine.pipe.backend.name,
                "max_batch": engine.runner.max_batch, "queue_depth": engine.runner.depth,
                # [smallest side, largest square side one image may ask now] (null: no limit known)
                "size_range": [engine.size_range[0], engine.largest_side()],
                "entity_slots": info.entity_slots,
                # what `deleaker_settings` may hold: the playground builds its fields from this
                "deleaker_settings": {name: kind.__name__ for name, kind in SETTING_KINDS.items()},
                "default_guidance": ImageGenerationRequest.model_fields["guidance"].default,
                **engine.model_card()}
        return JSONResponse(body, status_code=200 if status == "ready" else 503)

    app.mount(OPEN_PREFIX.rstrip("/"), StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def playground():
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(engine)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != engine.model_id:
            return _error(404, f"this server serves one model, {engine.model_id!r}; not {model_id!r}", "model")
        return _model_card(engine)

    @app.get("/metrics")
    async def metrics():
        return Response(m.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # a plain route, not FastAPI's: the body is parsed once, here, without the dependency machinery
    # that costs every request tens of microseconds of the event loop's time
    async def generate(request: Request):
        engine.in_flight += 1  # what a drain waits for (engine.busy)
        try:
            try:
                body = parse_body(await request.body(), request.headers.get("content-type"))
            except FieldError as e:
                return _error(400, str(e), api_field(e.field))
            return await _generate(body, request)
        finally:
            engine.in_flight -= 1

    app.add_route(GENERATE_PATH, generate, methods=["POST"])

    async def _generate(body: ImageGenerationRequest, request: Request):
        t0 = time.perf_counter()
        if engine.draining:
            return _error(503, "the server is shutting down", headers={"Connection": "close"})
        if not engine.ready:
            return _error(503, "the server is warming up", headers={"Retry-After": "1"})
        try:
            requests = engine.admit(body)
        except ValueError as e:  # a FieldError names its field; any other bad input is the request's as a whole
            return _error(400, str(e), api_field(getattr(e, "field", None)))
        ignored = body.ignored_fields(engine.model_id)
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            results = await engine.run(requests, gone)
        except QueueFull as e:
            return _error(429, str(e), headers={"Retry-After": str(e.retry_after_s)})
        except Draining:
            return _error(503, "the server is shutting down", headers={"Connection": "close"})
        except RequestTimeout:
            return _error(504, f"the request did not finish within {engine.options.timeout_s:g}s")
        except ClientGone:
            log.info("client disconnected; its queued images were dropped")
            return _error(499, "client disconnected")
        except FieldError as e:
            return _error(400, str(e), api_field(e.field))
        finally:
            gone.cancel()
        pngs = await asyncio.to_thread(lambda: [r.png_bytes() for r in results])
        request.state.images = len(results)  # for the access log line
        m.images.inc(len(results))
        m.latency.observe(time.perf_counter() - t0)
        data = [ImageData(b64_json=base64.b64encode(p).decode("ascii"), seed=r.request.seed)
                for p, r in zip(pngs, results)]
        answer = ImageGenerationResponse(created=int(time.time()), data=data)
        return Response(answer.model_dump_json(), media_type="application/json",
                        headers={IGNORED_HEADER: ", ".join(ignored)} if ignored else None)

    return app
