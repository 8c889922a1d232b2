"""The web app served for real by uvicorn on 127.0.0.1 (a free port) in a thread, for the tests that need a live
server (the browser tests, the body-size limit on the wire)."""
from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

from slimtune.ui.paths import Roots
from slimtune.ui.server import create_app


@contextlib.contextmanager
def serving(work: Path):
    """Yields the port of the app serving `work`; stops it after."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(Roots.at(work)), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(600):  # 30 s at most
            if server.started:
                break
            time.sleep(0.05)
        yield port
    finally:
        server.should_exit = True
        thread.join(10)
