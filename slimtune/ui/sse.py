"""Server-sent events: a run followed by reading its folder, and generated text token by token.

A run's stream starts with everything the folder holds (so a reload draws the same charts) and then sends
what is new every POLL seconds: metrics rows appended to metrics.jsonl, and a state event (status, step,
times, log tail) when it changes. A resumed run cuts metrics.jsonl back to its checkpoint; the stream then
starts over with a reset event."""
from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from . import runs

if TYPE_CHECKING:
    from transformers import TextIteratorStreamer

POLL = 0.5  # seconds between looks at a run folder: a step of a tiny CPU run takes ~20 ms, a GPU step more


def event(name: str, data: object) -> str:
    return f"event: {name}\ndata: {json.dumps(data, allow_nan=False, default=str)}\n\n"


def new_rows(path: Path, offset: int) -> tuple[list[dict], int, bool]:
    """(complete rows after offset, new offset, whether the file was cut back since)."""
    try:
        size = path.stat().st_size
    except OSError:
        return [], 0, offset > 0
    if size < offset:
        return [], 0, True
    with path.open("rb") as fh:
        fh.seek(offset)
        data = fh.read(size - offset)
    end = data.rfind(b"\n") + 1  # a line still being written waits for the next look
    rows = [json.loads(line) for line in data[:end].decode("utf-8").splitlines() if line.strip()]
    return rows, offset + end, False


async def follow(launcher: runs.Launcher, folder: Path, polls: int = 0,
                 closing: Callable[[], bool] = lambda: False) -> AsyncIterator[str]:
    """A run's events until the client goes away, the server stops (`closing()`), or after `polls` looks."""
    path, offset, last, n = folder / "metrics.jsonl", 0, None, 0
    while True:
        rows, offset, cut = new_rows(path, offset)
        if cut:
            yield event("reset", {})
            rows, offset, _ = new_rows(path, 0)
        if rows:
            yield event("rows", rows)
        now = runs.state(launcher, folder, with_rows=False)
        if now != last:
            yield event("state", now)
            last = now
        n += 1
        if (polls and n >= polls) or closing():
            return
        await asyncio.sleep(POLL)


def tokens(start: Callable[[], dict], streamer: TextIteratorStreamer) -> Iterator[str]:
    """Text pieces of one answer as events: `start()` generates in a thread and feeds `streamer` (transformers'
    TextIteratorStreamer); its result (a dict) comes last as a done event, an error as an error event."""
    box: dict = {}

    def work():
        try:
            box["result"] = start()
        except Exception as err:  # noqa: BLE001 - sent to the page, which shows it; the server goes on
            box["error"] = f"{type(err).__name__}: {err}"
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    for piece in streamer:
        if piece:
            yield event("token", piece)
    thread.join()
    yield event("error", box["error"]) if "error" in box else event("done", box.get("result", {}))
