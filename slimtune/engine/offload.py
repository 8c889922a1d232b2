"""Saved activations that wait in CPU memory until backward needs them (train.offload_activations).

With gradient checkpointing the tensors autograd keeps between forward and backward are, apart from the
head and loss, one hidden-state tensor per decoder layer (the checkpoint's input: `torch.utils.checkpoint`
saves it through the saved-tensor hooks active around the layer, these ones). Moving them to pinned CPU
memory takes layers x tokens x hidden x 2 bytes off the peak (a 1B model at 4,096 tokens a micro-batch:
0.25 GiB); unsloth's "unsloth" checkpointing does the same.

`torch.autograd.graph.save_on_cpu` copies synchronously: the CPU waits for the GPU at every layer, and on a
step the CPU already paces (launching kernels), that wait is the GPU's idle time too. Here the copy runs on a
side stream (non-blocking into pinned memory) and the GPU tensor's memory is only reused once that copy is
done (`record_stream`). Backward brings each one back while the layer after it in forward order runs its
backward: unpacking one saved tensor starts the copy of the one moved just before it (the next backward needs),
on the side stream, so the compute stream never waits on a host-to-device copy but the first. Parameters
(frozen weights the head keeps for its input gradient), small tensors and non-contiguous views stay where
they are: copying those would cost more than it frees.
"""
from __future__ import annotations

import weakref

import torch

MIN_BYTES = 1 << 20  # below this a copy costs more (launch, sync points) than the memory it frees
# A pinned host buffer is made once and reused by the same saved tensor of every later forward: page-locking
# memory is a slow driver call, and the caching host allocator made new blocks whenever a longer row reached a
# new power-of-two size (H200, 8B, 16 records a row: 1.44 s for such a step against a 0.60 s median). A buffer
# is first made for the longest forward the run can have (max_tokens), at most HEADROOM x what it is asked for;
# a forward that still outgrows it makes it GROWTH x larger. A buffer still held by a graph that has not run its
# backward (two forwards, then one backward of both) is never rewritten: that forward gets a new one.
HEADROOM, GROWTH = 4.0, 1.5
AHEAD = True  # unpacking a tensor starts bringing back the one before it (off: bench/speed.py's diagnostic)


class Moved:
    """A saved tensor while in CPU memory: its pinned copy, its device, the event of the copy out (None: done);
    `prev` the tensor the same forward moved before it (backward needs it next); `ahead` its device copy and that
    copy's event, once an unpack started bringing it back early."""
    __slots__ = ("host", "device", "done", "prev", "ahead")

    def __init__(self, host: torch.Tensor, device: torch.device, done: torch.cuda.Event | None,
                 prev: Moved | None) -> None:
        self.host, self.device, self.done, self.prev = host, device, done, prev
        self.ahead: tuple[torch.Tensor, torch.cuda.Event | None] | None = None


Packed = torch.Tensor | Moved  # what a saved tensor becomes: itself (kept), or its move to CPU memory


class OffloadActivations(torch.autograd.graph.saved_tensors_hooks):
    """Context manager around a forward: saved CUDA tensors of at least `min_bytes` go to pinned CPU memory
    and come back in backward; a tensor saved twice (RMSNorm's input by pow and mul) is copied once. On the
    CPU it changes nothing. `moved` lists (shape, bytes) of the tensors moved by the latest forward."""

    def __init__(self, model: torch.nn.Module | None = None, min_bytes: int = MIN_BYTES, device_type: str = "cuda",
                 max_tokens: int = 0) -> None:
        self.min_bytes = min_bytes
        self.max_tokens = max_tokens  # the most tokens a forward can hold (0: unknown, buffers as asked)
        self.pool: list[torch.Tensor] = []  # the i-th moved tensor's host buffer, reused forward after forward
        self._lent: dict[int, weakref.ref] = {}  # i -> the view of pool[i] the latest forward saved
        self._next = 0
        self.device_type = device_type  # "cpu" only in tests: plain copies stand in for the stream copies
        self.params = _storages(model) if model is not None else set()
        self.moved: list[tuple[tuple[int, ...], int]] = []
        self._seen: dict[int, tuple] = {}  # id(tensor) -> (weakref, version, packed), this forward's
        self._last: Moved | None = None  # the latest tensor this forward moved
        self.early = 0  # unpacks served by a copy started ahead of them (tests read it)
        super().__init__(self._pack, self._unpack)

    def __enter__(self) -> None:
        self.moved, self._seen, self._next, self._last = [], {}, 0, None
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        self._seen, self._last = {}, None
        return super().__exit__(*exc)

    def _keep(self, t: torch.Tensor) -> bool:
        return (t.device.type != self.device_type or isinstance(t, torch.nn.Parameter) or not t.is_contiguous()
                or t.numel() * t.element_size() < self.min_bytes or t.untyped_storage().data_ptr() in self.params)

    def _pack(self, t: torch.Tensor) -> Packed:
        if self._keep(t):
            return t
        same = self._seen.get(id(t))
        if same is not None and same[0]() is t and same[1] == t._version:
            return same[2]
        packed = self._move(t)
        self._seen[id(t)] = (weakref.ref(t), t._version, packed)
        self.moved.append((tuple(t.shape), t.numel() * t.element_size()))
        return packed

    def _move(self, t: torch.Tensor) -> Moved:
        i = self._next
        host = self._buffer(t.numel() * t.element_size(), t.numel() // max(t.shape[-1], 1) if t.dim() else 1)
        host = host.view(t.dtype).view(t.shape)
        self._lent[i] = weakref.ref(host)  # alive while the graph that saved it is: _buffer then leaves it alone
        self._last = Moved(host, t.device, copy_out(t, host), self._last)
        return self._last

    def _buffer(self, nbytes: int, tokens: int) -> torch.Tensor:
        """The next pinned buffer of this forward, `nbytes` long (a view of the reused one; a new one where it is
        too small or still held by a live graph)."""
        i, self._next = self._next, self._next + 1
        lent = self._lent.get(i)
        busy = lent is not None and lent() is not None
        if i < len(self.pool) and self.pool[i].numel() >= nbytes and not busy:
            return self.pool[i][:nbytes]
        if i < len(self.pool):  # too small, or still lent to a live graph (which keeps the old one): a new one
            grow = GROWTH if self.pool[i].numel() < nbytes else 1.0
            size = int(max(nbytes, grow * self.pool[i].numel()))
        else:
            ahead = min(HEADROOM, self.max_tokens / tokens) if self.max_tokens and tokens else 1.0
            size = int(nbytes * max(ahead, 1.0))
        size = -(-size // 512) * 512  # whole 512-byte lines: every dtype's view starts aligned
        pin = torch.cuda.is_available()  # (a CPU-only build has no pinned memory: the sizing tests run there)
        try:
            buf = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
        except RuntimeError:  # not that much pinnable memory: just what this tensor needs
            buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        if i < len(self.pool):
            self.pool[i] = buf
        else:
            self.pool.append(buf)
        return buf[:nbytes]

    def _unpack(self, packed: Packed) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        if packed.ahead is not None:  # brought back early: the compute stream waits only for that copy's end
            out, ready = packed.ahead
            packed.ahead = None  # a second unpack of the same tensor copies again: this one is autograd's now
            if ready is not None:
                torch.cuda.current_stream(packed.device).wait_event(ready)
            self.early += 1
        else:
            out = copy_back(packed.host, packed.device, packed.done)
        prev, packed.prev = packed.prev, None  # started once: what it brings back is then held by `prev` alone
        if prev is not None and prev.ahead is None and AHEAD:
            prev.ahead = copy_ahead(prev.host, prev.device)
        return out  # autograd gives it back its graph links


def _storages(model: torch.nn.Module) -> set[int]:
    """Where the model's parameters live; a sharded (FSDP2 DTensor) one by its local shard. The whole
    weights FSDP2 gathers for a layer's compute are nn.Parameters, which _keep leaves alone too."""
    out = set()
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        out.add(local.untyped_storage().data_ptr())
    return out


def copy_out(t: torch.Tensor, host: torch.Tensor) -> torch.cuda.Event | None:
    """Start copying `t` into the pinned `host`; the event the copy back waits for (None: done already).

    Orderings on CUDA: the side stream first waits for the current stream, so the copy reads `t` after the
    kernels that write it, and writes `host` after the last read of that reused buffer: the previous graph's
    copy back, which autograd queued on this same stream (backward runs each node on its forward's stream) and
    which the backward that freed that graph enqueued before this forward began (_buffer never hands out a
    buffer whose graph is alive). record_stream keeps the caching allocator from giving `t`'s memory to a
    later kernel before the side stream has read it."""
    if t.device.type != "cuda":  # CPU tests: the same buffers and views, copied in order
        host.copy_(t)
        return None
    stream = _side_stream(t.device)
    stream.wait_stream(torch.cuda.current_stream(t.device))
    with torch.cuda.stream(stream):
        host.copy_(t, non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)
    t.record_stream(stream)
    return done


def copy_back(host: torch.Tensor, device: torch.device, done: torch.cuda.Event | None) -> torch.Tensor:
    """A new `device` tensor of `host`'s values, ordered after copy_out's copy; never `host` itself, which the
    next forward rewrites."""
    if done is not None:
        torch.cuda.current_stream(device).wait_event(done)
    return host.to(device, non_blocking=done is not None, copy=True)


def copy_ahead(host: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Start bringing `host` back on the side stream while the compute stream runs on: a new `device` tensor and
    the event the compute stream waits for before reading it (None: done already).

    The tensor is the compute stream's memory; the side stream waits for the work queued there so far (which
    may still use that memory's previous tenant) and, being the stream copy_out wrote `host` on, copies after
    that write. record_stream keeps the memory from going to a later kernel before the copy is done, should the
    graph be freed without reading it."""
    if device.type != "cuda":  # CPU tests: the copy itself
        return host.to(device, copy=True), None
    out = torch.empty_like(host, device=device)
    stream = _side_stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        out.copy_(host, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(stream)
    out.record_stream(stream)
    return out, ready


_STREAMS: dict = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One copy stream per device for the whole process (a stream per forward would leak handles)."""
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]
