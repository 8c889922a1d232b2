"""The web app's routes: a thin face over forms, runs, comparing and chat. Errors come back as the CLI words
them: {"error": text, "fields": {dotted key: text}} with 400 (bad input), 403 (a path outside the roots) or
409 (a run that cannot be stopped or resumed now); guard.py answers before any route for a Host or Origin from
elsewhere (403), a body over its limit (413) and a body FastAPI cannot read (422)."""
from __future__ import annotations

from pathlib import Path

from fastapi import Body, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

from ..errors import SlimtuneError
from . import chat, comparing, forms, guard, runs, sse
from .paths import LOCAL, PathRefused, Roots

STATIC = Path(__file__).parent / "static"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# what /api/file serves: charts, and text shown as text (never HTML or SVG, which could run script in this origin)
FILES = {".png": "image/png", ".yaml": "text/plain", ".md": "text/plain", ".json": "application/json"}


def _error(request: Request, err: Exception) -> JSONResponse:
    code = 403 if isinstance(err, PathRefused) else 409 if isinstance(err, runs.RunStateError) else 400
    return guard.answer(code, str(err), getattr(err, "fields", None))


def create_app(roots: Roots, hosts: tuple[str, ...] | None = LOCAL) -> FastAPI:
    """The app for one working directory and runs directory (every path a request names lies under them).
    hosts: the names a request's Host may give (None: any, for --allow-remote)."""
    app = FastAPI(title="slimtune", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(SlimtuneError, _error)
    guard.install(app, hosts)  # Host, Origin, body size and text checked before any route

    launcher, loaded = runs.Launcher(roots), chat.Models()
    app.state.roots, app.state.launcher, app.state.models = roots, launcher, loaded
    app.state.closing = lambda: False  # serve() sets it to the server's shutdown flag
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/")
    def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/api/info")
    def info():
        return {"work": str(roots.work), "runs": str(roots.runs), **forms.schema()}

    _setup_routes(app, roots)
    _run_routes(app, roots, launcher)
    _chat_compare_routes(app, roots, launcher, loaded)
    return app


def _setup_routes(app: FastAPI, roots: Roots) -> None:
    @app.post("/api/config")
    def config(tree: dict = Body(..., embed=True)):
        cfg = forms.build(tree, roots)
        return {"yaml": forms.yaml_text(cfg), "warnings": forms.warnings(cfg)}

    @app.post("/api/preview")
    def preview(tree: dict = Body(..., embed=True), n: int = Body(3, embed=True)):
        return forms.preview(forms.build(tree, roots), n)

    @app.post("/api/estimate")
    def estimate(tree: dict = Body(..., embed=True), budget: str = Body("", embed=True)):
        return forms.estimate(forms.build(tree, roots), budget)


def _run_routes(app: FastAPI, roots: Roots, launcher: runs.Launcher) -> None:
    @app.post("/api/runs/start")
    def start(tree: dict = Body(..., embed=True)):
        return launcher.start(forms.build(tree, roots))

    @app.post("/api/runs/stop")
    def stop(folder: str = Body(..., embed=True)):
        return {"pid": launcher.stop(roots.check(folder, "folder"))}

    @app.post("/api/runs/resume")
    def resume(folder: str = Body(..., embed=True)):
        return launcher.resume(roots.check(folder, "folder"))

    @app.get("/api/runs")
    def listing(dir: str = ""):
        return {"runs": runs.listing(roots.check(dir or roots.runs, "dir"))}

    @app.get("/api/run")
    def run_state(folder: str):
        return runs.state(launcher, roots.check(folder, "folder"))

    @app.get("/api/run/events")
    def run_events(request: Request, folder: str, polls: int = 0):
        events = sse.follow(launcher, roots.check(folder, "folder"), polls, request.app.state.closing)
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)

    @app.get("/api/file")
    def file(path: str):
        p = roots.check(path)
        if p.suffix not in FILES or not p.is_file():
            raise PathRefused(f"path: {path}: not a file the app shows ({', '.join(FILES)})")
        return FileResponse(p, media_type=FILES[p.suffix])


def _chat_compare_routes(app: FastAPI, roots: Roots, launcher: runs.Launcher, loaded: chat.Models) -> None:
    @app.post("/api/chat")
    def answer(folder: str = Body(...), messages: list[dict] = Body(...), sampling: dict = Body({}),
               base: bool = Body(False), system: str = Body(""), device: str = Body("auto")):
        path = roots.check(folder, "folder")
        model = loaded.get(path, base, device)  # load errors answer as JSON, before the stream starts
        start, streamer = chat.answer(model, messages, chat.sampling(sampling), loaded.lock, system)
        return StreamingResponse(sse.tokens(start, streamer), media_type="text/event-stream", headers=SSE_HEADERS)

    @app.post("/api/compare/start")
    def compare_start(tree: dict = Body(...), methods: str = Body(""), output: str = Body(""),
                      objectives: str = Body("")):
        cfg = forms.build(tree, roots)
        out = roots.check(output or roots.runs / "compare", "output")
        return comparing.start(launcher, cfg, methods, out, objectives)

    @app.get("/api/compare")
    def compare_state(folder: str):
        return comparing.state(launcher, roots.check(folder, "folder"))

    @app.post("/api/compare/stop")
    def compare_stop(folder: str = Body(..., embed=True)):
        return {"pid": launcher.stop(roots.check(folder, "folder"))}
