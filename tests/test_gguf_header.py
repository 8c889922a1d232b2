""".gguf files are untrusted input: an empty, foreign, truncated or hostile file, or one without the metadata a
model needs, is one line naming the file and what is wrong in `inspect`, `chat` and `generate` (17 of 27 such
files gave tracebacks); a model whose weights do not fill it (a GGUF file or a safetensors folder) is refused
with the weights' names, for every verb that loads one; a fuzzed file lets only slimtune's errors out."""
from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import write_jsonl
from slimtune import cli, models
from slimtune.errors import MismatchError, SlimtuneError
from slimtune.export import gguf as gguf_mod

U32, STR = 4, 8


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_model_dir) -> Path:
    """conftest's tiny Llama (2 layers, tied embeddings) written as f16 GGUF (210 KB)."""
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    gguf_mod.write_gguf(tiny_model_dir, path, "f16", log=lambda *_: None)
    return path


def kv(key: str, kind: int, payload: bytes) -> bytes:
    return struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", kind) + payload


def text(value: str) -> bytes:
    return struct.pack("<Q", len(value.encode())) + value.encode()


def variant(src: Path, drop=(), put: dict | None = None, drop_tensors=()) -> bytes:
    """The file at src with metadata keys dropped or replaced (put: key -> whole encoded entry) and tensor
    entries dropped; the tensor data stays where it was, after the re-aligned header."""
    from gguf import GGUFReader

    raw, r = src.read_bytes(), GGUFReader(str(src))
    size = lambda f: sum(int(p.nbytes) for p in f.parts)  # noqa: E731
    put = dict(put or {})
    entries = [put.pop(k, raw[f.offset:f.offset + size(f)]) for k, f in r.fields.items()
               if not k.startswith("GGUF.") and k not in drop] + list(put.values())
    tensors = [raw[t.field.offset:t.field.offset + size(t.field)] for t in r.tensors if t.name not in drop_tensors]
    out = raw[:8] + struct.pack("<QQ", len(tensors), len(entries)) + b"".join(entries) + b"".join(tensors)
    return out + b"\0" * (-len(out) % 32) + raw[r.data_offset:]


def at_tensor(src: Path, what: str, value: int) -> bytes:
    """The file with the first tensor's dimension count, first dimension, type or data offset set to value."""
    from gguf import GGUFReader

    raw, t = src.read_bytes(), GGUFReader(str(src)).tensors[0]
    dims = t.field.offset + 8 + len(t.name.encode()) + 4
    where, fmt = {"n_dims": (dims - 4, "<I"), "dim": (dims, "<Q"), "type": (dims + 8 * len(t.shape), "<I"),
                  "offset": (dims + 8 * len(t.shape) + 4, "<Q")}[what]
    return raw[:where] + struct.pack(fmt, value) + raw[where + struct.calcsize(fmt):]


# (name, the file's bytes from the valid one, what the error says); each gave a traceback before
HOSTILE = [
    ("empty", lambda p: b"", "the file is empty"),
    ("magic", lambda p: b"GGUX" + p.read_bytes()[4:], "not a GGUF file (it starts with b'GGUX'"),
    ("v99", lambda p: b"GGUF" + struct.pack("<I", 99) + p.read_bytes()[8:], "GGUF version 99; slimtune"),
    ("header-cut", lambda p: p.read_bytes()[:10], "the tensor count at byte 8 needs 8 bytes but only 2 are left"),
    ("metadata-cut", lambda p: p.read_bytes()[:2000], "metadata 'tokenizer.ggml.tokens' (400 items): more than"),
    ("data-cut", lambda p: p.read_bytes()[:100_000], "lie past the end of the file (100,000 bytes)"),
    ("tensor-count", lambda p: p.read_bytes()[:8] + struct.pack("<Q", 2**62) + p.read_bytes()[16:],
     "4,611,686,018,427,387,904 tensors: more than the"),
    ("kv-count", lambda p: p.read_bytes()[:16] + struct.pack("<Q", 2**62) + p.read_bytes()[24:],
     "4,611,686,018,427,387,904 metadata entries: more than the"),
    ("key-length", lambda p: p.read_bytes()[:24] + struct.pack("<Q", 2**40) + p.read_bytes()[32:],
     "metadata key 0 at byte 32 needs 1,099,511,627,776 bytes"),
    ("key-utf8", lambda p: p.read_bytes()[:32] + b"\xff" + p.read_bytes()[33:],
     "metadata key 0 at byte 32 is not UTF-8"),
    ("dims", lambda p: at_tensor(p, "dim", 2**40), "tensor 'token_embd.weight': its 879,609,302,220,800 bytes"),
    ("n-dims", lambda p: at_tensor(p, "n_dims", 2**30), "has 1,073,741,824 dimensions (GGUF allows 1 to 4)"),
    ("offset", lambda p: at_tensor(p, "offset", 2**40), "at data offset 1,099,511,627,776 lie past the end"),
    ("tensor-type", lambda p: at_tensor(p, "type", 999), "tensor 'token_embd.weight' has type 999"),
    ("no-architecture", lambda p: variant(p, drop={"general.architecture"}), "no 'general.architecture'"),
    ("no-block-count", lambda p: variant(p, drop={"llama.block_count"}), "its metadata lacks llama.block_count;"),
    ("no-tokenizer", lambda p: variant(p, drop={"tokenizer.ggml.model", "tokenizer.ggml.tokens"}),
     "lacks tokenizer.ggml.model, tokenizer.ggml.tokens"),
    ("no-head-count", lambda p: variant(p, drop={"llama.attention.head_count"}), "lacks llama.attention.head_count;"),
    # transformers would build 2**31 layers before reading a weight
    ("layers", lambda p: variant(p, put={"llama.block_count": kv("llama.block_count", U32, struct.pack("<I", 2**31))}),
     "its metadata describes a model (2,147,483,648 layers of 64 x 128, 4 heads, 2 key/value heads) far larger "
     "than the 99,648 weight values it holds"),
    ("float-layers", lambda p: variant(p, put={"llama.block_count": kv("llama.block_count", 6, struct.pack("<f", 2))}),
     "llama.block_count is 2.0, not a positive whole number"),
]


def verb_line(verb: str, path: Path, tmp: Path) -> list[str]:
    data = write_jsonl(tmp / "prompts.jsonl", [{"instruction": "Hi there", "output": "Hello."}])
    return {"inspect": ["inspect", str(data), "--model", str(path)],
            "chat": ["chat", str(path), "--max-new-tokens", "2", "--device", "cpu"],
            "generate": ["generate", str(path), "--input", str(data), "--output", str(tmp / "out.jsonl"),
                         "--max-new-tokens", "2", "--device", "cpu", "--no-progress"]}[verb]


def one_line_error(verb: str, path: Path, tmp: Path, capsys, monkeypatch) -> str:
    lines = iter(["Hi", "/exit"])
    monkeypatch.setattr("builtins.input", lambda _prompt="": next(lines))
    capsys.readouterr()
    assert cli.main(verb_line(verb, path, tmp)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith((f"slimtune {verb}: error: {path}", f"slimtune {verb}: error: model.path: {path}")), err
    return err


@pytest.mark.parametrize("verb", ["inspect", "chat", "generate"])
@pytest.mark.parametrize("name,make,says", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_file_is_one_line(name, make, says, verb, tiny_gguf, tmp_path, capsys, monkeypatch):
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(make(tiny_gguf))
    assert says in one_line_error(verb, path, tmp_path, capsys, monkeypatch)


@pytest.mark.parametrize("verb", ["inspect", "chat", "generate"])
def test_huge_range_in_the_chat_template_is_one_line(verb, tiny_gguf, tmp_path, capsys, monkeypatch):
    """jinja's sandbox stops range(10**9) with an OverflowError, which came out as a traceback."""
    template = "{% for i in range(10**9) %}x{% endfor %}"
    path = tmp_path / "range.gguf"
    path.write_bytes(variant(tiny_gguf, put={"tokenizer.chat_template": kv("tokenizer.chat_template", STR,
                                                                          text(template))}))
    err = one_line_error(verb, path, tmp_path, capsys, monkeypatch)
    assert f"{path}: chat_template: the chat_template asks for more than the sandbox allows (OverflowError" in err


def test_layer_count_above_the_weights_names_the_missing_ones(tiny_gguf, tmp_path, capsys, monkeypatch, caplog):
    """block_count 32 over 2 layers of weights: transformers built 30 random layers and chat ran on them.
    Its table of the missing weights is left out: the one line names them."""
    path = tmp_path / "32.gguf"
    path.write_bytes(variant(tiny_gguf, put={"llama.block_count": kv("llama.block_count", U32, struct.pack("<I", 32))}))
    for verb in ("chat", "generate"):
        err = one_line_error(verb, path, tmp_path, capsys, monkeypatch)
        assert "the weights do not fit the model its metadata describes: 270 missing (" in err
        assert "model.layers.{2...31}.mlp.up_proj.weight" in err
    assert not [r for r in caplog.records if "LOAD REPORT" in r.getMessage()]


def test_gguf_without_a_tensor_is_refused(tiny_gguf, tmp_path, capsys, monkeypatch):
    path = tmp_path / "short.gguf"
    path.write_bytes(variant(tiny_gguf, drop_tensors={"blk.1.ffn_up.weight"}))
    err = one_line_error("chat", path, tmp_path, capsys, monkeypatch)
    assert err.endswith(f"{path}: the weights do not fit the model its metadata describes: 1 missing "
                        "(model.layers.1.mlp.up_proj.weight); its weights are incomplete or its metadata is wrong: "
                        "give a complete model")


def test_valid_file_and_tied_weights_load(tiny_gguf, tiny_model_dir):
    """lm_head is tied to embed_tokens in the tiny model: not a missing weight, in a GGUF file or a folder."""
    for path in (tiny_gguf, tiny_model_dir):
        model, _ = models.load(str(path))
        assert model.config.num_hidden_layers == 2 and model.config.tie_word_embeddings


def edited_folder(src: Path, tmp: Path, drop: str = "", add: str = "") -> Path:
    from safetensors.torch import load_file, save_file

    folder = tmp / "edited"
    shutil.copytree(src, folder)
    weights = load_file(folder / "model.safetensors")
    weights.pop(drop, None)
    if add:
        weights[add] = weights["model.norm.weight"].clone()
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_folder_missing_a_tensor_is_refused_by_every_loading_verb(tiny_model_dir, tmp_path, capsys):
    folder = edited_folder(tiny_model_dir, tmp_path, drop="model.layers.1.mlp.up_proj.weight", add="model.extra.weight")
    with pytest.raises(MismatchError) as err:
        models.load(str(folder))
    assert str(err.value) == (f"model.path: {folder}: the weights do not fit the model its config.json describes: "
                              "1 missing (model.layers.1.mlp.up_proj.weight); 1 unexpected (model.extra.weight); "
                              "its weights are incomplete or its config.json is wrong: give a complete model")
    data = write_jsonl(tmp_path / "held.jsonl", [{"instruction": "Say hi.", "output": "Hi."}])
    assert cli.main(["eval", "--base", str(folder), "--data", str(data), "--output", str(tmp_path / "ev"),
                     "--device", "cpu"]) == 2
    assert "1 missing (model.layers.1.mlp.up_proj.weight)" in capsys.readouterr().err


# fuzz: random bytes, the valid file cut short, bytes overwritten (in the 10 KB header, where a change moves
# lengths, counts and offsets), vocabulary and merges text overwritten with other text of the same length (the
# header stays readable: transformers builds a tokenizer of duplicate tokens and broken merges), and one
# metadata value replaced by a number of another type
EDIT = st.tuples(st.integers(0, 10_240), st.binary(min_size=1, max_size=8))
TEXT_EDIT = st.tuples(st.floats(0, 1), st.text("ab <>|", min_size=1, max_size=6))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["random", "cut", "edit", "text", "value"]), blob=st.binary(max_size=64),
       cut=st.integers(0, 210_000), edits=st.lists(EDIT, min_size=1, max_size=4),
       texts=st.lists(TEXT_EDIT, min_size=1, max_size=6),
       key=st.sampled_from(["llama.block_count", "llama.embedding_length", "llama.attention.head_count",
                            "tokenizer.ggml.bos_token_id", "general.alignment", "llama.context_length"]),
       number=st.integers(0, 2**64 - 1), kind_code=st.sampled_from([4, 5, 10, 12, 8]))
def test_fuzzed_file_lets_only_slimtune_errors_out(kind, blob, cut, edits, texts, key, number, kind_code, tiny_gguf,
                                                    tmp_path):
    raw = tiny_gguf.read_bytes()
    if kind == "random":
        data = b"GGUF" + struct.pack("<I", 3) + blob if blob[:1] != b"x" else blob
    elif kind == "cut":
        data = raw[:cut]
    elif kind == "edit":
        data = bytearray(raw)
        for at, new in edits:
            data[at:at + len(new)] = new
        data = bytes(data)
    elif kind == "text":  # within the strings of tokenizer.ggml.tokens and .merges, whole characters
        data = bytearray(raw)
        start, end = raw.find(b"tokenizer.ggml.tokens"), raw.find(b"tokenizer.ggml.bos_token_id")
        for where, new in texts:
            at = start + int(where * (end - start))
            run = next(i for i, b in enumerate(data[at:end] + b"\0") if not 0x20 <= b < 0x7f)  # ASCII text only
            new = new.encode()[:run]
            data[at:at + len(new)] = new
        data = bytes(data)
    else:
        payload = {4: struct.pack("<I", number % 2**32), 5: struct.pack("<i", number % 2**31),
                   10: struct.pack("<Q", number), 12: struct.pack("<d", float(number)), 8: text(str(number))}
        data = variant(tiny_gguf, put={key: kv(key, kind_code, payload[kind_code])})
    path = tmp_path / "fuzz.gguf"
    path.write_bytes(data)
    try:
        models.load(str(path))
    except SlimtuneError as err:
        assert str(path) in str(err) and "\n" not in str(err)
