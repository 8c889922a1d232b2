"""Scores of generated answers against references: exact match, token F1, BLEU-4, ROUGE-1/2/L, and
precision/recall/F1 over item sets for extraction tasks. Plain Python, no dependencies.

Chinese (and Japanese) text has no spaces between words, so a whitespace tokenizer sees a whole
Chinese sentence as one token and scores it all-or-nothing. Every tokenizer here splits CJK text
into single characters instead: the usual choice for Chinese BLEU (sacrebleu's `zh` tokenizer) and
ROUGE, and it needs no word segmenter.

BLEU equals sacrebleu's corpus_bleu (13a tokens, exp smoothing; CJK split as sacrebleu's `zh`);
ROUGE equals rouge-score's RougeScorer without stemming on English. tests/evaluate checks both.
"""
from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter

# Han ideographs (and extensions), kana, CJK symbols and punctuation, full-width forms
_CJK = re.compile("([\u2e80-\u2fdf\u2ff0-\u303f\u3040-\u30ff\u3100-\u312f\u31a0-\u31ef\u3200-\u4dbf"
                  "\u4e00-\u9fff\uf900-\ufaff\ufe10-\ufe1f\ufe30-\ufe4f\uff00-\uffef\U00020000-\U0003134f])")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# sacrebleu's 13a rules (mteval-v13a.pl): punctuation becomes its own token, except inside numbers
_BLEU_RULES = [
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),
]
_WORD = re.compile(r"[^\W_]+")  # letters and digits: rouge-score's [a-z0-9]+, for every script


def _split_cjk(text: str) -> str:
    return _CJK.sub(r" \1 ", text)


def normalize(text: str) -> str:
    """For EM and F1 (as SQuAD): NFKC, lower case, no punctuation or symbols, no English articles."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text)
    return " ".join(_ARTICLES.sub(" ", text).split())


def f1_tokens(text: str) -> list[str]:
    return _split_cjk(normalize(text)).split()


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    """F1 over the multiset of normalized tokens (CJK per character); both empty counts as a match."""
    pred, ref = f1_tokens(prediction), f1_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    p, r = common / len(pred), common / len(ref)
    return 2 * p * r / (p + r)


def bleu_tokens(text: str) -> list[str]:
    """sacrebleu's 13a tokenizer, with CJK characters split off first (its `zh` tokenizer)."""
    text = text.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in text:
        text = text.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    text = f" {_split_cjk(text.strip())} "
    for rx, repl in _BLEU_RULES:
        text = rx.sub(repl, text)
    return text.split()


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu_stats(prediction: str, reference: str, order: int = 4) -> list[int]:
    """[hyp length, ref length, matches for n = 1..order, hyp n-grams for n = 1..order]."""
    hyp, ref = bleu_tokens(prediction), bleu_tokens(reference)
    correct, total = [], []
    for n in range(1, order + 1):
        h = _ngrams(hyp, n)
        correct.append(sum((h & _ngrams(ref, n)).values()))
        total.append(max(len(hyp) - n + 1, 0))
    return [len(hyp), len(ref), *correct, *total]


def bleu_from_stats(stats: list[int], order: int = 4, effective_order: bool = False) -> float:
    """BLEU (0-100) from summed bleu_stats, with sacrebleu's default `exp` smoothing: an order with no
    match counts as 1 / (2^k * its n-grams) for the k-th such order, so one missing 4-gram does not zero
    a short answer's score. effective_order (sentence BLEU) ignores orders longer than the answer."""
    sys_len, ref_len = stats[0], stats[1]
    correct, total = stats[2:2 + order], stats[2 + order:2 + 2 * order]
    if not any(correct):
        return 0.0
    bp = 1.0 if sys_len >= ref_len else (math.exp(1 - ref_len / sys_len) if sys_len > 0 else 0.0)
    precisions, smooth, used = [0.0] * order, 1.0, order
    for n in range(order):
        if total[n] == 0:
            break
        if effective_order:
            used = n + 1
        if correct[n] == 0:
            smooth *= 2
            precisions[n] = 100.0 / (smooth * total[n])
        else:
            precisions[n] = 100.0 * correct[n] / total[n]
    logs = [math.log(p) if p > 0 else -9999999999 for p in precisions[:used]]
    return bp * math.exp(sum(logs) / used)


def corpus_bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU-4 (0-100): n-gram counts summed over all answers, then one score (as sacrebleu)."""
    sums = [0] * 10
    for p, r in zip(predictions, references, strict=True):
        sums = [a + b for a, b in zip(sums, bleu_stats(p, r))]
    return bleu_from_stats(sums)


def sentence_bleu(prediction: str, reference: str) -> float:
    """One answer's BLEU-4 (0-100), as sacrebleu.sentence_bleu (exp smoothing, effective order)."""
    return bleu_from_stats(bleu_stats(prediction, reference), effective_order=True)


def rouge_tokens(text: str) -> list[str]:
    """Lower-cased runs of letters and digits (rouge-score's tokenizer on English), CJK per character."""
    return _WORD.findall(_split_cjk(text.lower()))


def _f(overlap: int, n_pred: int, n_ref: int) -> float:
    p, r = overlap / max(n_pred, 1), overlap / max(n_ref, 1)
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F-measures (0-1) of one answer."""
    pred, ref = rouge_tokens(prediction), rouge_tokens(reference)
    out = {}
    for n in (1, 2):
        p, r = _ngrams(pred, n), _ngrams(ref, n)
        out[f"rouge{n}"] = _f(sum((p & r).values()), sum(p.values()), sum(r.values()))
    out["rougeL"] = _f(_lcs(ref, pred), len(pred), len(ref)) if pred and ref else 0.0
    return out


def items(text: str, separator: str = "\n") -> set[str]:
    """The set of items in an answer: split on the separator, whitespace trimmed and collapsed, NFKC
    (so full-width and half-width forms match), empty items dropped, duplicates counted once."""
    parts = (" ".join(unicodedata.normalize("NFKC", x).split()) for x in text.split(separator))
    return {x for x in parts if x}


def prf(tp: int, n_pred: int, n_gold: int) -> dict[str, float]:
    """Precision, recall, F1 from counts; nothing predicted and nothing expected is a perfect score."""
    if n_pred == 0 and n_gold == 0:
        return {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    p, r = (tp / n_pred if n_pred else 0.0), (tp / n_gold if n_gold else 0.0)
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


def extraction_counts(prediction: str, reference: str, separator: str = "\n") -> tuple[int, int, int]:
    """(true positives, predicted items, gold items) over the two item sets."""
    pred, gold = items(prediction, separator), items(reference, separator)
    return len(pred & gold), len(pred), len(gold)


def score_answer(prediction: str, reference: str, extraction_sep: str | None = None) -> dict[str, float]:
    """Every per-answer score (0-1 except BLEU, 0-100), as written beside each prediction."""
    row = {"em": exact_match(prediction, reference), "f1": token_f1(prediction, reference),
           "bleu4": sentence_bleu(prediction, reference), **rouge(prediction, reference)}
    if extraction_sep is not None:
        counts = extraction_counts(prediction, reference, extraction_sep)
        row.update({f"extraction_{k}": v for k, v in prf(*counts).items()})
    return row


def corpus_scores(predictions: list[str], references: list[str], extraction_sep: str | None = None) -> dict:
    """Corpus scores, in percent: EM, F1 and ROUGE are means over answers, BLEU-4 is corpus BLEU, and
    extraction P/R/F1 are micro-averaged (item counts summed over all answers)."""
    n = len(predictions)
    rows = [score_answer(p, r) for p, r in zip(predictions, references, strict=True)]
    out = {k: 100 * sum(row[k] for row in rows) / max(n, 1) for k in ("em", "f1", "rouge1", "rouge2", "rougeL")}
    out["bleu4"] = corpus_bleu(predictions, references)
    if extraction_sep is not None:
        sums = [0, 0, 0]
        for p, r in zip(predictions, references):
            sums = [a + b for a, b in zip(sums, extraction_counts(p, r, extraction_sep))]
        out.update({f"extraction_{k}": 100 * v for k, v in prf(*sums).items()})
    return out
