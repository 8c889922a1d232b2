"""The memory estimate and the batch split count a preference record as its two sequences (chosen and rejected,
one forward): a micro-batch of m records is estimated as 2m rows."""
from __future__ import annotations

from slimtune import config
from slimtune.data.pairs import EncodedPair
from slimtune.engine import memory, preference_step


def _cfg(tiny_model_dir, objective: str) -> config.Config:
    cfg = config.Config()
    cfg.model.path = str(tiny_model_dir)
    cfg.method = config.MethodConfig(r=4, dropout=0.05, target_modules=["q_proj", "v_proj"])  # padded engine
    cfg.train = config.TrainConfig(precision="bf16", micro_batch_size=2, objective=objective)
    cfg.data.max_len = 40
    return cfg


def test_a_record_is_estimated_as_two_rows(tiny_model_dir):
    dpo = memory.estimate(_cfg(tiny_model_dir, "dpo"), [(30, 12), (20, 7)])
    sft = memory.estimate(_cfg(tiny_model_dir, "sft"), [(30, 6), (30, 6), (20, 4), (20, 3)])
    assert dpo.activations == sft.activations and dpo.logits == sft.logits and dpo.peak == sft.peak
    single = memory.estimate(_cfg(tiny_model_dir, "sft"), [(30, 12), (20, 7)])
    assert dpo.activations == 2 * single.activations  # padded to 30: 4 rows of 30 tokens, not 2
    worst = memory.estimate(_cfg(tiny_model_dir, "dpo"))  # no data: 2 x micro_batch_size rows of data.max_len
    assert worst.activations == memory.estimate(_cfg(tiny_model_dir, "sft"), [(40, 40)] * 4).activations


def test_record_sizes_are_the_wider_answer_and_both_answers_tokens():
    pairs = [EncodedPair([1] * 5, [2] * 3, [3] * 9), EncodedPair([1] * 20, [2] * 4, [3] * 2)]
    assert preference_step.sizes(pairs) == [(24, 6), (14, 12)]


def test_kto_partners_are_the_next_records_answer_cut_to_max_len():
    from slimtune.engine.preference_step import kto_partners

    pairs = [EncodedPair([1] * 6, [2] * 3, [], label=True), EncodedPair([1] * 2, [3] * 9, [], label=False)]
    assert [p.rejected for p in kto_partners(pairs)] == [[3] * 9, [2] * 3]
    assert [p.rejected for p in kto_partners(pairs, max_len=10)] == [[3] * 4, [2] * 3]  # 6 + 4 = 10 tokens
