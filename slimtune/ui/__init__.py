"""`slimtune ui`: the local web app (Setup, Train, Runs, Chat, Compare pages) over the functions the CLI calls.

It binds 127.0.0.1 unless the user names another host and says so with --allow-remote: whoever reaches the
port can start runs and read files under the working directory. FastAPI and uvicorn are the optional extra
`slimtune[ui]`; this module imports them only when the server starts, so the rest of slimtune works without."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import MissingPackageError, SlimtuneError
from .paths import LOCAL, Roots


class HostRefused(SlimtuneError):
    """--host names another interface than loopback without --allow-remote."""


def check_host(host: str, allow_remote: bool) -> str | None:
    """None for loopback; the warning to print for another host with allow_remote; HostRefused otherwise."""
    if host in LOCAL:
        return None
    if not allow_remote:
        raise HostRefused(f"--host {host}: the app would be reachable from other machines, and anyone who reaches "
                          "the port can start runs and read files under the working directory; pass "
                          "--allow-remote as well if that is what you want, or leave --host out (127.0.0.1)")
    return (f"warning: serving on {host}: anyone who can reach this port can start runs and read files under "
            "the working directory (there is no login)")


def serve(host: str = "127.0.0.1", port: int = 7860, runs: str = "runs", allow_remote: bool = False,
          log: Callable[[str], None] = print) -> None:
    """Run the app until Ctrl-C, from the current directory (relative paths in the forms are read from it)."""
    warning = check_host(host, allow_remote)
    try:  # the optional extra: a missing one is a message, not a traceback
        import uvicorn

        from .server import create_app
    except ImportError as err:
        raise MissingPackageError(f"slimtune ui needs FastAPI and uvicorn ({err}): pip install 'slimtune[ui]'") \
            from None
    if warning:
        log(warning)
    roots = Roots.at(Path.cwd(), runs)
    log(f"slimtune ui: http://{host}:{port}/ (working directory {roots.work}, runs in {roots.runs}); Ctrl-C stops")
    app = create_app(roots, None if warning else LOCAL)  # any Host header only when serving to others anyway
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    app.state.closing = lambda: server.should_exit  # Ctrl-C: the open event streams end, so the server can
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn raises the signal again once it has shut down: Ctrl-C is the way out
        pass
    log("slimtune ui: stopped (runs it started go on; start it again to watch them)")
