"""An Ollama Modelfile beside an exported GGUF: the same chat template (as a Go template) and stop tokens.

Everything is read back from the GGUF file itself, so the Modelfile says what the file says. The Go
template is cut out of the Jinja chat template by rendering it on marker conversations:
  [user U1] + generation prompt             = HEAD + U1 + TAIL
  [system S, user U1] + generation prompt   = HEAD_SYS(S) + U1 + TAIL
  [user U1, assistant A1, user U2] + prompt = HEAD + U1 + TAIL_MID + A1 + MID + U2 + TAIL
(TAIL_MID differs from TAIL where a header's final space belongs to the answer, as Llama-2's "[/INST] ":
the generation prompt stops before it.)
A template these three do not explain (one that renders a turn differently by position beyond the
first, say) is refused rather than written wrong.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import ExportError

U1, U2, A1, S = "\x01U1\x01", "\x01U2\x01", "\x01A1\x01", "\x01S\x01"


@dataclass
class Pieces:
    head: str  # before the first user message, no system message given (may hold a default system)
    head_sys: str  # the same with a system message, which stands at {system}
    tail: str  # after the last user message: end of turn + the assistant header (the generation prompt)
    tail_mid: str  # the same after an earlier user message, which an answer follows
    mid: str  # after an assistant message: end of turn + the next user header


def render_jinja(template: str, messages: list[dict], bos: str, eos: str, add_generation_prompt: bool) -> str:
    """Render a chat_template as transformers does (sandboxed, trim_blocks, lstrip_blocks)."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise ExportError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, bos_token=bos, eos_token=eos,
                                            add_generation_prompt=add_generation_prompt)


def pieces(template: str, bos: str = "", eos: str = "") -> Pieces:
    def rendered(msgs: list[tuple[str, str]]) -> str:
        return render_jinja(template, [{"role": r, "content": c} for r, c in msgs], bos, eos, True)

    g0 = rendered([("user", U1)])
    g1 = rendered([("system", S), ("user", U1)])
    g2 = rendered([("user", U1), ("assistant", A1), ("user", U2)])
    head, _, tail = g0.partition(U1)
    head_sys, _, tail_sys = g1.partition(U1)
    tail_mid, _, rest = g2.partition(U1)[2].partition(A1)
    mid = rest.partition(U2)[0]
    if S not in head_sys or tail_sys != tail or g2 != f"{head}{U1}{tail_mid}{A1}{mid}{U2}{tail}":
        raise ExportError("chat template: its turns are not written the same way at every position, so it "
                          "cannot be expressed as an Ollama Go template; write the Modelfile's TEMPLATE by hand")
    return Pieces(head, head_sys.replace(S, "{system}"), tail, tail_mid, mid)


def go_template(p: Pieces) -> str:
    """The Modelfile TEMPLATE: no whitespace between actions, so every character is the template's."""
    head = "{{ if .System }}" + p.head_sys.replace("{system}", "{{ .System }}") + "{{ else }}" + p.head + "{{ end }}"
    if p.tail_mid == p.tail:
        return (head + "{{ range .Messages }}{{ if eq .Role \"user\" }}{{ .Content }}" + p.tail
                + "{{ else if eq .Role \"assistant\" }}{{ .Content }}" + p.mid + "{{ end }}{{ end }}")
    return (head + "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
            "{{ if eq .Role \"user\" }}{{ .Content }}{{ if $last }}" + p.tail + "{{ else }}" + p.tail_mid
            + "{{ end }}{{ else if eq .Role \"assistant\" }}{{ .Content }}" + p.mid + "{{ end }}{{ end }}")


def render_like_ollama(p: Pieces, messages: list[dict]) -> str:
    """What go_template(p) renders for a conversation (system messages go to .System, as Ollama does)."""
    system = "".join(m["content"] for m in messages if m["role"] == "system")
    text = p.head_sys.replace("{system}", system) if system else p.head
    for i, m in enumerate(messages):
        if m["role"] == "user":
            text += m["content"] + (p.tail if i == len(messages) - 1 else p.tail_mid)
        elif m["role"] == "assistant":
            text += m["content"] + p.mid
    return text


def read_meta(gguf_path: Path) -> dict:
    """Chat template, BOS/EOS text and the stop tokens (eos, eot, eom) stored in a GGUF file."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_path)).fields

    def value(key: str) -> Any:
        return fields[key].contents() if key in fields else None

    tokens = fields["tokenizer.ggml.tokens"]

    def text(key: str) -> str | None:
        i = value(key)
        return None if i is None else bytes(tokens.parts[tokens.data[i]]).decode("utf-8")

    stops = [text(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    return {"template": value("tokenizer.chat_template"), "bos": text("tokenizer.ggml.bos_token_id") or "",
            "eos": text("tokenizer.ggml.eos_token_id") or "",
            "stops": [s for i, s in enumerate(stops) if s and s not in stops[:i]]}


def _quoted(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_modelfile(gguf_path: str | Path, log: Callable[[str], None] = print) -> Path:
    """Write `Modelfile` beside the GGUF and print the `ollama create` command."""
    gguf_path = Path(gguf_path)
    meta = read_meta(gguf_path)
    if not meta["template"]:
        raise ExportError(f"{gguf_path}: the file holds no chat template; train with a data.template or give a "
                          "tokenizer with a chat_template")
    p = pieces(meta["template"], meta["bos"], meta["eos"])
    lines = [f"FROM ./{gguf_path.name}", f'TEMPLATE """{go_template(p)}"""']
    lines += [f"PARAMETER stop {_quoted(s)}" for s in meta["stops"]]
    out = gguf_path.with_name("Modelfile")
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    name = gguf_path.stem.lower().replace("_", "-")
    log(f"wrote {out}; load it into Ollama with:\n  cd {gguf_path.parent} && ollama create {name} -f Modelfile")
    return out
