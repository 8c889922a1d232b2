"""Generated token ids to text, whole characters only: at once (an answer) or as they arrive (a streamer).

A character outside ASCII spans several tokens of a byte-level tokenizer (SmolLM2's and GPT-2's BPE; a
Chinese character is three bytes, often in two or three tokens), and the tokenizer decodes an unfinished
one as U+FFFD. An answer cut at max_new_tokens, and a streamed answer between tokens, can end inside a
character: that end is held back (streaming) or left out (the answer), never shown as U+FFFD. A U+FFFD the
model wrote whole (its three bytes EF BF BD) is text and stays."""
from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from transformers import TextIteratorStreamer, TextStreamer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback tokens


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, reversed: printable bytes stand for themselves, the other 68 for U+0100 on."""
    kept = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table = {chr(b): b for b in kept}
    table.update({chr(256 + k): b for k, b in enumerate(b for b in range(256) if b not in kept)})
    return table


def _byte_level(tokenizer: PreTrainedTokenizerBase) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return "ByteLevel" in repr(getattr(backend, "decoder", None)) or hasattr(tokenizer, "byte_decoder")


def _tail_bytes(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> bytes:
    """The bytes of the last 4 tokens that decode to text (an unfinished character is at most 3 bytes)."""
    special = set(tokenizer.all_special_ids)
    tail = [i for i in ids[-16:] if i not in special][-4:]
    alphabet, byte_level, out = _byte_level_alphabet(), _byte_level(tokenizer), b""
    for token in tokenizer.convert_ids_to_tokens(tail):
        one = _BYTE_TOKEN.fullmatch(token)
        if one:
            out += bytes([int(one.group(1), 16)])
        elif byte_level and all(c in alphabet for c in token):
            out += bytes(alphabet[c] for c in token)
        else:
            out += token.replace("\u2581", " ").encode("utf-8")
    return out


def unfinished(data: bytes) -> int:
    """How many bytes at the end of `data` begin a UTF-8 character that they do not finish (0 to 3)."""
    for back in range(1, min(3, len(data)) + 1):
        lead = data[-back]
        if lead & 0xC0 == 0x80:  # a continuation byte: the character began further back
            continue
        need = 2 if lead & 0xE0 == 0xC0 else 3 if lead & 0xF0 == 0xE0 else 4 if lead & 0xF8 == 0xF0 else 1
        return back if need > back else 0
    return 0


def whole_text(tokenizer: PreTrainedTokenizerBase, ids: list[int], **decode_kwargs: Any) -> str:
    """tokenizer.decode(ids), less a character the ids only begin (shown as U+FFFD at the end)."""
    text = tokenizer.decode(ids, **decode_kwargs)
    if not text.endswith("\ufffd"):
        return text
    cut = unfinished(_tail_bytes(tokenizer, ids))
    if cut and _byte_level(tokenizer):
        cut = 1  # the byte-level decoder writes one U+FFFD for an unfinished character, byte fallback one a byte
    return text[:len(text) - min(cut, len(text) - len(text.rstrip("\ufffd")))]


class _WholeChars:
    """The tokenizer as transformers' streamers see it: decode gives whole characters only, so the streamer
    holds back an unfinished one until its last byte comes and leaves it out at the end."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer

    def decode(self, ids: int | Iterable[int], **decode_kwargs: Any) -> str:
        return whole_text(self.tokenizer, [ids] if isinstance(ids, int) else list(ids), **decode_kwargs)

    def __getattr__(self, name: str) -> Any:  # anything else a streamer asks of the tokenizer
        return getattr(self.tokenizer, name)


def printer(tokenizer: PreTrainedTokenizerBase) -> TextStreamer:
    """Prints one answer to stdout as it is generated (not the prompt, not special tokens); make one per
    answer: a streamer stopped mid-answer (Ctrl-C) keeps that answer's state."""
    return TextStreamer(_WholeChars(tokenizer), skip_prompt=True, skip_special_tokens=True)


def queue(tokenizer: PreTrainedTokenizerBase, timeout: float | None = None) -> TextIteratorStreamer:
    """One answer's text pieces as an iterator (for a web page), as `printer` prints them."""
    return TextIteratorStreamer(_WholeChars(tokenizer), skip_prompt=True, timeout=timeout, skip_special_tokens=True)
