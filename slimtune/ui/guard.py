"""The checks every request passes before a route sees it, as one ASGI middleware around the whole app: the Host
the page was opened as, the Origin of a request that changes something, the body's size (counted as it
arrives, so a chunked body without Content-Length is cut off too) and the text a JSON body holds. A refusal is
one line in the app's error shape, {"error": text, "fields": {}}: 403 for a Host or Origin from elsewhere, 413
for a body over the limit, 400 for text that is not text; FastAPI's own refusals (a body that is not JSON, a
field missing or of the wrong type) are worded the same way."""
from __future__ import annotations

import json

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from ..data.checks import SURROGATE

MIB = 1024 * 1024
# a form is a few KiB (data files travel as paths, never as contents); a 200 MB body once held the server for
# over a minute at 1.1 GB, a 10 MB one for 10 s
MAX_BODY = 4 * MIB
SAFE = ("GET", "HEAD", "OPTIONS")  # methods no route changes anything for: no Origin check, no body read


def answer(status: int, error: str, fields: dict | None = None, headers: dict | None = None) -> JSONResponse:
    """The app's error shape; text that cannot be UTF-8 (an unpaired surrogate) is escaped, not a 500."""
    def safe(text: object) -> str:
        return str(text).encode("utf-8", "backslashreplace").decode("utf-8")
    body = {"error": safe(error), "fields": {safe(k): safe(v) for k, v in (fields or {}).items()}}
    return JSONResponse(body, status_code=status, headers=headers)


def origin_refused(conn: HTTPConnection) -> str | None:
    """Why a request that changes something may not: its Origin (sent by every browser with a POST) names
    another site than the one it is addressed to. A page elsewhere may post JSON here without reading the
    answer; the browser's preflight alone stood in its way. No Origin: a script or curl, not a page."""
    origin = conn.headers.get("origin")
    if origin is None:
        return None
    # both name the host as the address bar does (no default port): a page of this app sends its own Host
    if origin.startswith(("http://", "https://")) and \
            origin.split("://", 1)[1].rstrip("/").lower() == conn.headers.get("host", "").lower():
        return None
    return (f"Origin {origin!r} refused: only the app's own page may start, stop or change anything here; "
            f"open it as {conn.scope.get('scheme', 'http')}://{conn.headers.get('host', '127.0.0.1:PORT')}/")


def _unpaired(tree: object) -> str | None:
    """The dotted place of the first string (key or value) holding an unpaired surrogate, which no file name,
    config or reply can hold; None when there is none. A loop: JSON may nest as deep as the parser allows."""
    stack = [("", tree)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str) and SURROGATE.search(value):
            return where or "(body)"
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, item in items:
            if isinstance(key, str) and SURROGATE.search(key):
                return f"{where}.{key!r}".lstrip(".")
            stack.append((f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}".lstrip("."), item))
    return None


def text_refused(body: bytes) -> tuple[str, str] | None:
    """(where, why) a JSON body's text may not go on to a route: bytes that are not UTF-8, nesting deeper than
    the parser goes, a string holding an unpaired surrogate (a \\ud800-style escape). Other bodies that are not
    JSON pass: the route's parser answers for them."""
    try:
        where = _unpaired(json.loads(body)) if body else None
    except UnicodeDecodeError as err:
        return "", f"request body: not UTF-8 text ({err.reason} at byte {err.start}); send the form as JSON"
    except RecursionError:
        return "", "request body: JSON nested deeper than the server reads; send the form as the page builds it"
    except ValueError:
        return None
    return where and (where, f"{where}: holds an unpaired surrogate (a \\ud800-style escape), which is not text; "
                             "fix or remove that character")


def too_big(limit: int) -> JSONResponse:
    return answer(413, f"request body over {limit // MIB} MiB: the app's forms send a few KiB (a data file goes by "
                       "its path, not its contents); send less", headers={"Connection": "close"})


class Guard:
    """The ASGI middleware: hosts are the names a request's Host may give (None: any, for --allow-remote)."""

    def __init__(self, app: ASGIApp, hosts: tuple[str, ...] | None, limit: int = MAX_BODY):
        self.app, self.hosts, self.limit = app, hosts, limit

    def refused(self, conn: HTTPConnection) -> str | None:
        try:
            host = conn.url.hostname
        except ValueError:  # a Host header urlsplit cannot read ("[")
            host = None
        # a web page elsewhere can point its own domain name at 127.0.0.1 (DNS rebinding) and then call this
        # server as its own origin; its requests carry that name in Host, so only loopback names are served
        if self.hosts is not None and host not in self.hosts:
            return f"Host {host!r} refused: open the app as http://127.0.0.1:PORT/"
        return None if conn.scope["method"] in SAFE else origin_refused(conn)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        conn = HTTPConnection(scope)
        why = self.refused(conn)
        if why:
            return await answer(403, why)(scope, receive, send)
        length = conn.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.limit:
            return await too_big(self.limit)(scope, receive, send)
        if scope["method"] in SAFE:
            return await self.app(scope, receive, send)
        body = await self.read(receive)
        if body is None:
            return await too_big(self.limit)(scope, receive, send)
        refusal = text_refused(body)
        if refusal:  # a form's field beside its input, as the config's own errors are
            where, why = refusal
            fields = {where.removeprefix("tree."): why} if where.startswith("tree.") else None
            return await answer(400, why, fields)(scope, receive, send)
        await self.app(scope, _replay(body, receive), send)

    async def read(self, receive: Receive) -> bytes | None:
        """The whole body, counted as it arrives; None as soon as it passes the limit (the rest is never read:
        the 413 goes out with Connection: close)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return b""
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """receive() for the route: the body read already, then the client's own messages (a disconnect)."""
    sent = False

    async def again():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}
    return again


def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
    """FastAPI's refusal of a body (not JSON, a field missing or of the wrong type) in the app's words."""
    lines = []
    for e in err.errors():
        where = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in e.get("loc", ())[1:]).lstrip(".")
        where = where or "request body"
        if e.get("type") == "json_invalid":
            lines.append(f"request body: not JSON ({e.get('ctx', {}).get('error', 'cannot be read')}); send an "
                         "object such as {\"tree\": {...}}")
        else:
            lines.append(f"{where}: {e.get('msg', 'invalid').lower()}")
    return answer(422, "; ".join(dict.fromkeys(lines)))


def _http(request: Request, err: HTTPException) -> JSONResponse:
    return answer(err.status_code, err.detail, headers=getattr(err, "headers", None))


def install(app: FastAPI, hosts: tuple[str, ...] | None, limit: int = MAX_BODY) -> None:
    """Put the checks in front of every route, and FastAPI's own refusals in the app's error shape."""
    app.add_middleware(Guard, hosts=hosts, limit=limit)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(HTTPException, _http)
