"""What `slimtune chat` prints: each answer as generated, whole characters only, nothing of an answer stopped by
Ctrl-C carried into the next one, and a line for /reset."""
from __future__ import annotations

from scripted import ZH, Scripted, reader

from slimtune.commands import chat
from slimtune.evaluate.generate import Sampling


def _chat(model, tokenizer, lines: list, max_new_tokens: int, system: str = "") -> list[dict]:
    return chat.chat_loop(model, tokenizer, "chatml", "cpu", Sampling(max_new_tokens=max_new_tokens), system,
                          read=reader(lines))


def _answers(out: str) -> list[str]:
    """The answers as printed after each `assistant> `."""
    return out.split("assistant> ")[1:]


def test_an_answer_cut_inside_a_character_is_printed_and_kept_without_it(tokenizer, capsys):
    history = _chat(Scripted(tokenizer.encode(ZH, add_special_tokens=False)), tokenizer, ["说中文", "/exit"], 2)
    assert _answers(capsys.readouterr().out) == ["中文\n"]  # was 中文\ufffd
    assert history[-1] == {"role": "assistant", "content": "中文"}


def test_after_ctrl_c_during_an_answer_the_next_answer_is_printed_alone(tokenizer, capsys):
    """Ctrl-C one token into an answer (中 and the first bytes of 文 shown or held back): the next answer
    printed is that answer only, not a U+FFFD and the echo of its prompt."""
    model = Scripted(tokenizer.encode(ZH, add_special_tokens=False), interrupt_after=1)
    history = _chat(model, tokenizer, ["first question", "second question", EOFError], 3)
    out, err = capsys.readouterr()
    assert _answers(out) == ["中", ZH + "\n"], out  # the stopped answer, then the next one as it is saved
    assert "[stopped: this answer and its question are left out" in err
    assert history == [{"role": "user", "content": "second question"}, {"role": "assistant", "content": ZH}]


def test_reset_says_the_history_is_cleared(tokenizer, capsys):
    model = Scripted(tokenizer.encode("Paris", add_special_tokens=False))
    history = _chat(model, tokenizer, ["Hi", "/reset", "/exit"], 4, system="Be brief.")
    err = capsys.readouterr().err
    assert "[history cleared: the next question starts a new conversation, with the same system prompt]" in err
    assert history == [{"role": "system", "content": "Be brief."}]
    _chat(model, tokenizer, ["/reset", "/exit"], 4)
    assert "[history cleared: the next question starts a new conversation]\n" in capsys.readouterr().err
