"""Metrics against hand-computed values (English, Chinese, empty answers, duplicate items) and against
the reference implementations sacrebleu and rouge-score."""
from __future__ import annotations

import math

import pytest

from slimtune.evaluate import metrics as M

EN = [  # (prediction, reference)
    ("The cat is on the mat.", "The cat sat on the mat."),
    ("Paris is France's capital.", "Paris is the capital of France, isn't it?"),
    ("It costs about $3.50 (3,000 yen).", "It costs $3.50 - roughly 3,000 yen!"),
    ("The quick brown fox jumped over a lazy dog", "A quick brown fox jumps over the lazy dog"),
    ("", "Hello world"),
    ("Give three tips: eat well, sleep, and exercise daily.",
     "Eat a balanced diet, exercise regularly and sleep well."),
    ("completely unrelated words here", "nothing in common at all"),
]


def test_exact_match_normalizes_case_punctuation_articles_and_width():
    assert M.exact_match("The Eiffel Tower!", "eiffel tower") == 1.0
    assert M.exact_match("an apple", "Apple.") == 1.0
    assert M.exact_match("北京。", "北京") == 1.0  # CJK full stop is punctuation
    assert M.exact_match("ＡＢＣ１２３", "abc123") == 1.0  # full-width forms (NFKC)
    assert M.exact_match("Paris, France", "Paris") == 0.0
    assert M.exact_match("", "") == 1.0 and M.exact_match("", "x") == 0.0


def test_token_f1_hand_computed():
    # articles dropped: pred [cat, sat, on, mat], ref [cat, is, on, mat, today]: 3 common, p 3/4, r 3/5
    want = 2 * (3 / 4) * (3 / 5) / (3 / 4 + 3 / 5)
    assert M.token_f1("The cat sat on the mat", "A cat is on the mat today") == pytest.approx(want)
    assert M.token_f1("dog dog dog", "dog") == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))  # counts are clipped
    assert M.token_f1("", "something") == 0.0 and M.token_f1("something", "") == 0.0
    assert M.token_f1("", "") == 1.0 and M.token_f1("...", "!") == 1.0  # both empty after normalization


def test_chinese_is_scored_per_character():
    # 我爱北京天安门 vs 我爱北京: 4 common characters, p = 4/4, r = 4/7
    assert M.f1_tokens("我爱北京天安门。") == list("我爱北京天安门")
    assert M.token_f1("我爱北京", "我爱北京天安门。") == pytest.approx(2 * 1 * (4 / 7) / (1 + 4 / 7))
    # a whitespace tokenizer would give 0: the whole sentence is one "word"
    assert M.token_f1("今天天气很好", "今天天气不错") == pytest.approx(4 / 6)
    assert M.f1_tokens("用Python写 hello world程序") == ["用", "python", "写", "hello", "world", "程", "序"]
    r = M.rouge("我爱北京。", "我爱北京天安门。")  # tokens 我 爱 北 京 vs 我 爱 北 京 天 安 门
    assert r["rouge1"] == pytest.approx(2 * 1 * (4 / 7) / (1 + 4 / 7))
    assert r["rouge2"] == pytest.approx(2 * 1 * (3 / 6) / (1 + 3 / 6))
    assert r["rougeL"] == pytest.approx(r["rouge1"])
    assert M.bleu_tokens("我爱Python，3.14。") == ["我", "爱", "Python", "，", "3.14", "。"]


def test_bleu_hand_computed():
    # identical: every precision 100, no brevity penalty
    assert M.sentence_bleu("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(100.0)
    # hyp "the cat on the mat" (5 tokens) vs ref "the cat sat on the mat" (6):
    # 1-grams 5/5, 2-grams 3/4 (the cat, on the, the mat), 3-grams 1/3 (on the mat), 4-grams 0/2 -> exp
    # smoothing: 100 / (2 * 2); brevity penalty exp(1 - 6/5)
    p = [100.0, 75.0, 100 / 3, 100 / (2 * 2)]
    expected = math.exp(1 - 6 / 5) * math.exp(sum(math.log(x) for x in p) / 4)
    assert M.sentence_bleu("the cat on the mat", "the cat sat on the mat") == pytest.approx(expected)
    assert M.sentence_bleu("", "the cat") == 0.0
    assert M.corpus_bleu(["", ""], ["a b", "c d"]) == 0.0


def test_rouge_hand_computed_and_empty():
    r = M.rouge("the cat was found under the bed", "the cat was under the bed")
    assert r["rouge1"] == pytest.approx(2 * (6 / 7) * 1 / (6 / 7 + 1))
    assert r["rouge2"] == pytest.approx(2 * (4 / 6) * (4 / 5) / (4 / 6 + 4 / 5))
    assert r["rougeL"] == pytest.approx(r["rouge1"])  # the whole reference is a subsequence
    assert M.rouge("", "the cat") == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}


def test_extraction_sets_count_duplicates_once():
    gold = "Obama_born_in_Hawaii\nObama_president_of_USA\nHawaii_part_of_USA"
    pred = "Obama_born_in_Hawaii\n  Obama_born_in_Hawaii \n\nObama_president_of_USA\nHawaii_capital_Honolulu"
    assert M.items(pred) == {"Obama_born_in_Hawaii", "Obama_president_of_USA", "Hawaii_capital_Honolulu"}
    assert M.extraction_counts(pred, gold) == (2, 3, 3)
    assert M.prf(2, 3, 3) == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3})
    assert M.extraction_counts("a;b;a;", "a;c", separator=";") == (1, 2, 2)
    assert M.prf(0, 0, 2) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}  # empty prediction
    assert M.prf(0, 0, 0) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}  # nothing to find, nothing found
    assert M.extraction_counts("北京_首都_中国\n上海_位于_中国", "北京_首都_中国") == (1, 2, 1)
    # micro average over records: tp 2 + 0, predicted 3 + 1, gold 3 + 1
    scores = M.corpus_scores([pred, "x"], [gold, "y"], extraction_sep="\n")
    assert scores["extraction_precision"] == pytest.approx(50.0) and scores["extraction_recall"] == pytest.approx(50.0)


def test_corpus_scores_are_means_in_percent():
    s = M.corpus_scores(["Paris", "", "我爱北京"], ["paris.", "London", "我爱北京天安门"])
    assert s["em"] == pytest.approx(100 / 3)
    assert s["f1"] == pytest.approx(100 * (1 + 0 + 2 * (4 / 7) / (1 + 4 / 7)) / 3)
    assert set(s) == {"em", "f1", "bleu4", "rouge1", "rouge2", "rougeL"}


def test_bleu_agrees_with_sacrebleu():
    sacrebleu = pytest.importorskip("sacrebleu")
    preds, refs = [p for p, _ in EN], [r for _, r in EN]
    assert M.corpus_bleu(preds, refs) == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score, abs=1e-9)
    for p, r in EN:
        assert M.sentence_bleu(p, r) == pytest.approx(sacrebleu.sentence_bleu(p, [r]).score, abs=1e-9), (p, r)
    zh = [("我爱北京。", "我爱北京天安门。"), ("今天天气不错，去公园吧", "今天天气很好，我们去公园吧！")]
    for p, r in zh:  # Chinese: sacrebleu's zh tokenizer also splits characters
        want = sacrebleu.sentence_bleu(p, [r], tokenize="zh").score
        assert M.sentence_bleu(p, r) == pytest.approx(want, abs=1e-9)


def test_rouge_agrees_with_rouge_score():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    for p, r in EN:
        ref = {k: v.fmeasure for k, v in scorer.score(r, p).items()}
        assert M.rouge(p, r) == pytest.approx(ref, abs=1e-12), (p, r)
