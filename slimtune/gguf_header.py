"""Check an untrusted .gguf file before transformers reads it: the header, every metadata key and value, and the
tensor table, each length and offset checked against the file's size. A damaged or hostile file is then one line
naming it and what is wrong (transformers' own reader stopped with struct.error, UnicodeDecodeError or "cannot
reshape array"), and the metadata a model needs is there before any weight loads: without `<arch>.block_count`
transformers built its default 32 layers around a 2-layer file's weights."""
from __future__ import annotations

import contextlib
import functools
import mmap
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import gguf
import numpy as np
import numpy.typing as npt
from gguf.constants import GGML_QUANT_SIZES

from .errors import DamagedFileError, SlimtuneError

VERSIONS = (2, 3)  # what transformers' and gguf's readers handle
MAX_DIMS = 4  # GGML_MAX_DIMS: llama.cpp's tensors have at most 4 dimensions
MAX_DEPTH = 3  # arrays of arrays: llama.cpp writes none; a bound keeps a hostile nesting from recursing deep
DEFAULT_ALIGNMENT = 32
STRING, ARRAY = 8, 9
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
# llama.cpp refuses a model file without these (its required get_key calls); transformers used defaults instead
MODEL_KEYS = ("block_count", "context_length", "embedding_length")
# and a file with attention weights needs its head count to split them (transformers' default is 32 heads:
# without GQA the weights fit and the model runs wrong); Mamba-like files have none
SIZE_KEYS = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count",
             "attention.head_count_kv")
ATTENTION_TENSORS = (".attn_q.", ".attn_qkv.")
TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.tokens")
# smallest record: a key/value pair (8-byte length, empty key, type, 1-byte value); a tensor entry (8-byte name
# length, 4-byte dimension count, type, 8-byte offset)
MIN_KV, MIN_TENSOR = 13, 24


class Array(NamedTuple):
    """A metadata array, kept as its length (a vocabulary's 50,000 strings are checked, not kept)."""
    items: int


class GGUFFileError(DamagedFileError):
    """A .gguf file that cannot be read as a model: not GGUF, cut short, damaged, or without the metadata a
    model needs."""


@dataclass
class Header:
    """What a checked .gguf file holds: metadata (arrays as their item count) and each tensor's dimensions."""
    path: Path
    version: int
    metadata: dict = field(default_factory=dict)
    tensors: dict[str, list[int]] = field(default_factory=dict)
    elements: int = 0  # the weights' values, all tensors together


class _Cursor:
    """Reads little-endian values from the file, each read checked against the bytes left."""

    def __init__(self, buf: bytes | mmap.mmap, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def fail(self, what: str) -> GGUFFileError:
        return GGUFFileError(f"{self.path}: {what}; the file is damaged or not a complete GGUF model "
                             "(export or download it again)")

    def take(self, n: int, what: str) -> bytes:
        left = len(self.buf) - self.pos
        if n > left:
            raise self.fail(f"{what} at byte {self.pos} needs {n:,} bytes but only {left:,} are left")
        self.pos += n
        return self.buf[self.pos - n:self.pos]

    def unpack(self, fmt: str, what: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        raw = self.take(self.unpack("Q", f"the length of {what}"), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} at byte {self.pos - len(raw)} is not UTF-8 text") from None

    def value(self, kind: int, what: str, depth: int = 0):
        """A metadata value: scalars and strings as themselves, an array as Array(its length)."""
        if kind in SCALARS:
            return self.unpack(SCALARS[kind], what)
        if kind == STRING:
            return self.string(what)
        if kind != ARRAY or depth >= MAX_DEPTH:
            raise self.fail(f"{what} has value type {kind}, which GGUF does not define"
                            if kind != ARRAY else f"{what} nests arrays deeper than {MAX_DEPTH}")
        item, count = self.unpack("I", f"the item type of {what}"), self.unpack("Q", f"the length of {what}")
        if item in SCALARS:  # skipped whole: a million-entry array costs no Python loop
            self.take(count * struct.calcsize(SCALARS[item]), f"{what} ({count:,} items)")
        else:
            self.room(count, 8, f"{what} ({count:,} items)")
            for i in range(count):
                self.value(item, f"{what}[{i}]", depth + 1)
        return Array(count)

    def room(self, count: int, least: int, what: str) -> None:
        """Refuse a count the bytes left cannot hold, before looping over it."""
        if count * least > len(self.buf) - self.pos:
            raise self.fail(f"{what}: more than the {len(self.buf) - self.pos:,} bytes left can hold")


def read(path: Path) -> Header:
    """The file's header, metadata and tensor table, every part checked; a GGUFFileError names what is wrong."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise GGUFFileError(f"{path}: the file is empty; give a complete .gguf model file")
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = _Cursor(buf, path)
        magic = cur.take(4, "the GGUF magic") if size >= 4 else b""
        if magic != b"GGUF":
            raise GGUFFileError(f"{path}: not a GGUF file (it starts with {bytes(buf[:4])!r}, a GGUF file with "
                                "b'GGUF'); give a .gguf model file")
        header = Header(path, cur.unpack("I", "the GGUF version"))
        if header.version not in VERSIONS:
            order = " (big-endian, which slimtune does not read)" if header.version >> 24 in VERSIONS else ""
            raise GGUFFileError(f"{path}: GGUF version {header.version}{order}; slimtune (through transformers) reads "
                                f"versions {' and '.join(map(str, VERSIONS))}: convert it with a current llama.cpp")
        n_tensors, n_kv = cur.unpack("Q", "the tensor count"), cur.unpack("Q", "the metadata count")
        cur.room(n_kv, MIN_KV, f"{n_kv:,} metadata entries")
        for i in range(n_kv):
            key = cur.string(f"metadata key {i}")
            if key in header.metadata:
                raise cur.fail(f"metadata key {key!r} appears twice")
            header.metadata[key] = cur.value(cur.unpack("I", f"the type of {key!r}"), f"metadata {key!r}")
        cur.room(n_tensors, MIN_TENSOR, f"{n_tensors:,} tensors")
        table = [_tensor_entry(cur, header, i) for i in range(n_tensors)]
        _check_data(cur, header, table)
    return header


def _tensor_entry(cur: _Cursor, header: Header, i: int) -> tuple[str, int, int]:
    """(name, offset, bytes) of tensor i, its dimensions and type checked."""
    name = cur.string(f"the name of tensor {i}")
    what = f"tensor {name!r}"
    if name in header.tensors:
        raise cur.fail(f"{what} appears twice")
    n_dims = cur.unpack("I", f"the dimension count of {what}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise cur.fail(f"{what} has {n_dims:,} dimensions (GGUF allows 1 to {MAX_DIMS})")
    dims = [cur.unpack("Q", f"dimension {d} of {what}") for d in range(n_dims)]
    kind = cur.unpack("I", f"the type of {what}")
    if kind not in {int(t) for t in GGML_QUANT_SIZES}:
        raise cur.fail(f"{what} has type {kind}, which GGUF does not define")
    block, block_bytes = next(v for t, v in GGML_QUANT_SIZES.items() if int(t) == kind)
    elements = 1
    for d in dims:
        elements *= d
    if 0 in dims or dims[0] % block:
        raise cur.fail(f"{what} has shape {dims}, which its type (blocks of {block}) cannot hold")
    header.tensors[name] = dims
    header.elements += elements
    return name, cur.unpack("Q", f"the data offset of {what}"), elements // block * block_bytes


def _check_data(cur: _Cursor, header: Header, table: list[tuple[str, int, int]]) -> None:
    """Every tensor's bytes lie inside the file, after the header's aligned end."""
    align = header.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(align, int) or isinstance(align, bool) or align <= 0 or align & (align - 1):
        raise cur.fail(f"metadata 'general.alignment' is {align!r}, not a power of two")
    start = -(-cur.pos // align) * align
    size = len(cur.buf)
    for name, offset, nbytes in table:
        if offset % align or start + offset + nbytes > size:
            raise cur.fail(f"tensor {name!r}: its {nbytes:,} bytes at data offset {offset:,} lie past the end of the "
                           f"file ({size:,} bytes) or off its {align}-byte alignment")


def check(path: Path, tokenizer: bool = True) -> Header:
    """read(path), and the metadata a model (and, with tokenizer, its tokenizer) is built from is there."""
    header = read(path)
    arch = header.metadata.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise GGUFFileError(f"{path}: no 'general.architecture' in its metadata, so the model it holds is unknown; "
                            "export or convert it again (llama.cpp's convert_hf_to_gguf.py writes it)")
    attention = any(part in name for name in header.tensors for part in ATTENTION_TENSORS)
    need = [f"{arch}.{k}" for k in MODEL_KEYS + ("attention.head_count",) * attention]
    need += list(TOKENIZER_KEYS) if tokenizer else []
    missing = [k for k in need if k not in header.metadata]
    if missing:
        them = "it" if len(missing) == 1 else "them"
        raise GGUFFileError(f"{path}: its metadata lacks {', '.join(missing)}; without {them} "
                            "the model (or its tokenizer) would be built from defaults, not from the file: export or "
                            "convert it again")
    _check_sizes(header, arch)
    return header


def _check_sizes(header: Header, arch: str) -> None:
    """The model the metadata describes is about as large as the weights the file holds: transformers builds
    it before it reads a weight, so a block_count or embedding_length of 2**32 would fill the memory first.
    Every layer holds at least hidden x (hidden + feed_forward) values (attention's query and output, and the
    MLP's three projections, each at least half that), so 2x the file's values bounds what its layers need."""
    meta = {k: header.metadata[f"{arch}.{k}"] for k in SIZE_KEYS if f"{arch}.{k}" in header.metadata}
    bad = [f"{arch}.{k} is {v!r}" for k, v in meta.items() if not isinstance(v, (int, Array)) or isinstance(v, bool)
           or (isinstance(v, int) and v < 1)]
    if bad:
        raise GGUFFileError(f"{header.path}: {'; '.join(bad)}, not a positive whole number: export or convert it again")
    # an absent size, or one given per layer (an array), counts as 1: the bound stays a lower one
    layers, hidden, ffn, heads, kv_heads = (meta.get(k) if isinstance(meta.get(k), int) else 1 for k in SIZE_KEYS)
    if layers * hidden * (hidden + ffn) > 2 * header.elements + 2**20 or heads > hidden or kv_heads > heads:
        raise GGUFFileError(f"{header.path}: its metadata describes a model ({layers:,} layers of {hidden:,} x "
                            f"{ffn:,}, {heads:,} heads, {kv_heads:,} key/value heads) far larger than the "
                            f"{header.elements:,} weight values it holds, or with more heads than dimensions; the "
                            "file is damaged or its metadata is wrong: export or convert it again")


@contextlib.contextmanager
def refusals(path: Path):
    """What transformers' GGUF reader still raises on a file check() passed, as one line naming it."""
    try:
        yield
    except SlimtuneError:
        raise
    # any: transformers, huggingface_hub's config validation, numpy and torch each raise their own types on
    # a file whose values check() cannot judge (a hidden size no multiple of the heads, a float token id)
    except Exception as err:  # noqa: BLE001
        said = " ".join(str(err).split()) or type(err).__name__
        said = said if len(said) <= 300 else said[:297] + "..."
        raise GGUFFileError(f"{path}: transformers cannot load this GGUF file ({type(err).__name__}: {said}); "
                            "export or convert it again") from None


_READS = threading.RLock()  # reads_once patches the gguf module for the whole process


class _PlainReader(gguf.GGUFReader):
    """gguf.GGUFReader whose reads slice a plain ndarray view of its memory map: each slice of an np.memmap
    runs memmap's Python __getitem__ and __array_finalize__ (7M calls, ~4 s, to parse one file of a 49k-token
    vocabulary). Same bytes, same offsets; the arrays it returns still share the file's mapping."""

    def _get(self, offset: int, dtype: npt.DTypeLike, count: int = 1,
             override_order: str | None = None) -> npt.NDArray:
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self._plain = self.data.view(np.ndarray)
        count = int(count)
        dtype = np.dtype(dtype)
        arr = plain[offset:offset + dtype.itemsize * count].view(dtype=dtype)[:count]
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))


@contextlib.contextmanager
def reads_once() -> Iterator[None]:
    """While inside, transformers' GGUF loading parses each file once and builds gguf's TensorNameMap once per
    (arch, layers): it parsed the file for the tokenizer, the config and the weights (each ~2 s of CPU for a
    49k-token vocabulary: gguf.GGUFReader reads every string in Python) and built the name map anew for each
    submodule it walks (~400 times, 4.6 s, for SmolLM2-135M). The readers are read-only memory maps, kept only
    inside; one thread at a time (the web app's), so each puts back what it found."""
    with _READS:
        read, build = gguf.GGUFReader, gguf.get_tensor_name_map
        readers: dict[tuple[str, str], gguf.GGUFReader] = {}

        def reader(path: str | Path, mode: str = "r") -> gguf.GGUFReader:
            key = (str(Path(path).resolve()), mode)
            if key not in readers:
                readers[key] = _PlainReader(path, mode)
            return readers[key]

        gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(build)
        try:
            yield
        finally:
            gguf.GGUFReader, gguf.get_tensor_name_map = read, build
