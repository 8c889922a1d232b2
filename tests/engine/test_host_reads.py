"""One host read of the device per optimizer step: on a GPU every .item() / int(t) / float(t) / bool(t) /
.tolist() waits for all queued work, and on a small model (paced by the CPU launching kernels) each wait
leaves the GPU idle. Counted on the CPU by wrapping those methods for the length of each training step."""
from __future__ import annotations

import contextlib
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import lora_run_config
from slimtune import cli
from slimtune.runs.metrics_log import read_metrics

STEPS = 4
READS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__")

# Per-step losses and per-tensor (sum, sum of |x|) of the adapter of the runs below, recorded with the loop
# as it was before the reads were cut (commit a5f1bc1), when a step read the device 13 times (padded
# micro-batches of 2), 11 (micro-batches of 1) and 11 (packed), besides the CPU AdamW's reads; the runs must
# train the same numbers.
LOSSES_ONE = [6.94154539562407, 6.626141548156738, 6.642589167544716, 6.203035736083985]  # micro-batches of 1
LOSSES_PACKED = [6.80493392944336, 6.681148719787598, 6.339002497055951, 6.361434349646935]  # packing=on
LOSSES = [6.796885420636433, 6.492899576822917, 6.606947708129883, 6.50727000989412]
PREFIX = 'base_model.model.model.layers.'
ADAPTER = {  # names without PREFIX
    '0.self_attn.q_proj.lora_A.weight': (-0.4658697764389217, 17.93010765640065),
    '0.self_attn.q_proj.lora_B.weight': (-0.2024829614238115, 4.064609194479999),
    '0.self_attn.v_proj.lora_A.weight': (0.6751514282659627, 16.767727266589645),
    '0.self_attn.v_proj.lora_B.weight': (-0.16812414076412097, 2.243825404497329),
    '1.self_attn.q_proj.lora_A.weight': (0.26371315319556743, 15.859402736532502),
    '1.self_attn.q_proj.lora_B.weight': (0.04933772416552529, 4.054726377304178),
    '1.self_attn.v_proj.lora_A.weight': (0.6721508235204965, 16.872625577496365),
    '1.self_attn.v_proj.lora_B.weight': (-0.3320638823788613, 2.1896209090482444),
}


def _config(tmp: Path, model_dir: Path, micro: int = 2, packing: str = "off") -> Path:
    """An explicit split (`micro` records a micro-batch, 2 micro-batches a step) on the tiny model, fp32 on the
    CPU."""
    return lora_run_config(tmp, model_dir, f"run{micro}{packing}", max_steps=STEPS, micro_batch_size=micro,
                           grad_accum=2, packing=packing)


def _origin() -> str | None:
    """Who reads: None for torch's AdamW on the CPU, which reads each parameter's step counter
    (optimizer._get_value; on CUDA build_optimizer takes the fused AdamW, which keeps it on the device);
    "mask" for transformers' SDPA mask, which reads a padded batch's attention_mask twice a forward to see
    whether it may drop it; else "step"."""
    files = [f.filename for f in traceback.extract_stack(limit=10)]
    if any(f.endswith(("optim/adam.py", "optim/adamw.py", "optim/optimizer.py")) for f in files):
        return None
    return "mask" if any(f.endswith("masking_utils.py") for f in files) else "step"


@contextlib.contextmanager
def counted_reads(monkeypatch, loop):
    """Per training step, the device reads made inside loop._step as (origin, method) pairs (a checkpoint
    save or an eval is outside it)."""
    inside, reads = [False], []
    for name in READS:
        real = getattr(torch.Tensor, name)

        def wrapper(self, *args, _real=real, _name=name, **kwargs):
            if inside[0] and (origin := _origin()):
                reads.append((origin, _name))
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, wrapper)
    real_step, per_step = loop._step, []

    def step(*args, **kwargs):
        inside[0], start = True, len(reads)
        try:
            return real_step(*args, **kwargs)
        finally:
            inside[0] = False
            per_step.append(reads[start:])
    monkeypatch.setattr(loop, "_step", step)
    yield per_step


def _counted_fit(tmp: Path, model_dir: Path, micro: int, packing: str = "off") -> tuple[Path, list]:
    import slimtune.engine.loop as loop

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the recorded numbers were computed on one thread
    try:
        with pytest.MonkeyPatch.context() as mp, counted_reads(mp, loop) as per_step:
            assert cli.main(["train", str(_config(tmp, model_dir, micro, packing)), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    return tmp / f"run{micro}{packing}", per_step


@pytest.fixture(scope="module")
def counted_run(tmp_path_factory, tiny_model_dir):
    return _counted_fit(tmp_path_factory.mktemp("reads"), tiny_model_dir, 2)


def test_one_device_read_per_optimizer_step(counted_run):
    _, per_step = counted_run
    assert len(per_step) == STEPS
    # the loop's one read: torch.stack([loss sum, grad norm]).tolist() after backward and clip (before: 13,
    # 4 token counts before the forward, a count and an .item() per micro-batch, float(grad norm))
    assert [[r for r in reads if r[0] == "step"] for reads in per_step] == [[("step", "tolist")]] * STEPS
    # transformers' own: two bool() of a padded micro-batch's attention_mask in its SDPA mask; step 3 has one
    # micro-batch of two records of one length, sent without a mask (data/stream.collate_micro), and a forward
    # without mask or cache (engine/loss.py passes use_cache=False) has its position_ids checked for packed
    # records once (masking_utils.find_packed_sequence_indices): 2 + 1
    masks = [[r for r in reads if r[0] == "mask"] for reads in per_step]
    assert masks == [[("mask", "__bool__")] * n for n in (4, 4, 3, 4)]


def test_unpadded_micro_batches_read_once_per_step(tmp_path, tiny_model_dir):
    """One record a micro-batch needs no padding, so no attention_mask: the step's one read is all of ours."""
    run, per_step = _counted_fit(tmp_path, tiny_model_dir, 1)
    losses = [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert losses == pytest.approx(LOSSES_ONE, abs=1e-6)  # as with the all-ones mask before
    # ours: the one read; transformers': one look at position_ids a forward (2 micro-batches), which it makes
    # when a forward has neither mask nor cache (masking_utils.find_packed_sequence_indices, before the first layer)
    assert per_step == [[("mask", "__bool__")] * 2 + [("step", "tolist")]] * STEPS


def test_packed_micro_batches_read_once_per_step(tmp_path, tiny_model_dir):
    """Packed rows (train.packing=on; on the CPU the plain-PyTorch attention, one SDPA call per record) bring
    their record offsets as host ints (data/pack.BOUNDS): no layer reads them from the device."""
    run, per_step = _counted_fit(tmp_path, tiny_model_dir, 2, "on")
    losses = [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert losses == pytest.approx(LOSSES_PACKED, abs=1e-6)
    assert per_step == [[("mask", "__bool__")] * 2 + [("step", "tolist")]] * STEPS  # as above


def test_losses_and_adapter_equal_those_before_the_reads_were_cut(counted_run):
    run, _ = counted_run
    losses = [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    adapter = {k.removeprefix(PREFIX): v for k, v in load_file(run / "adapter_model.safetensors").items()}
    assert losses == pytest.approx(LOSSES, abs=1e-6)
    assert sorted(adapter) == sorted(ADAPTER)
    for k, (total, size) in ADAPTER.items():
        assert float(adapter[k].double().sum()) == pytest.approx(total, abs=1e-6), k
        assert float(adapter[k].double().abs().sum()) == pytest.approx(size, abs=1e-6), k


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_host_counts_equal_what_the_collated_batches_hold(packed, world):
    """stream.counts (the records, on the host) = trained_tokens and pack.tokens on every rank's collated
    share, summed: first labels trained or not, an all-masked record, equal and unequal lengths, idle ranks."""
    import random

    from slimtune.data import pack
    from slimtune.data.encode import Encoded
    from slimtune.data.stream import collate_micro, counts, share
    from slimtune.engine.loop import trained_tokens

    rng = random.Random(world * 2 + packed)
    for trial in range(20):
        records = []
        for i in range(rng.randint(1, 4)):
            n = rng.choice([1, 5, 9]) if trial % 2 else 6
            labels = [rng.choice([-100, 7]) for _ in range(n)] if i else [-100] * n
            records.append(Encoded(list(range(1, n + 1)), labels, f"r{i}"))
        want_trained = want_tokens = 0
        for k in range(world):
            batch = collate_micro(share(records, k, world), packed, 0, "cpu")
            want_trained += trained_tokens([batch])
            want_tokens += pack.tokens(batch)
        assert counts(records, world) == (want_trained, want_tokens)
        assert want_tokens >= sum(len(r.input_ids) for r in records)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("chunked", [False, True])
def test_loss_by_host_index_equals_loss_by_device_mask(packed, chunked):
    """The loss takes its rows by the host's TRAINED index: the very loss, count and gradients of the mask."""
    import random

    from conftest import make_model
    from slimtune.data.collate import TRAINED
    from slimtune.data.encode import Encoded
    from slimtune.data.stream import collate_micro
    from slimtune.engine.loss import token_loss_sum

    rng = random.Random(packed)
    records = [Encoded([rng.randrange(400) for _ in range(n)], [-100] * (n // 2) + [rng.randrange(400)
                                                                                  for _ in range(n - n // 2)])
               for n in (7, 12, 3)]
    batch = collate_micro(records, packed, 0, "cpu")
    model = make_model(400)
    results = []
    for b in (batch, {k: v for k, v in batch.items() if k != TRAINED}):
        model.zero_grad()
        loss, count = token_loss_sum(model, b, chunked)
        loss.backward()
        results.append((loss.detach(), int(count), [p.grad.clone() for p in model.parameters()]))
    (by_index, n_index, g_index), (by_mask, n_mask, g_mask) = results
    assert n_index == n_mask == sum(n - n // 2 for n in (7, 12, 3))  # each first label is -100
    assert torch.equal(by_index, by_mask) and by_index > 0
    assert all(torch.equal(a, b) for a, b in zip(g_index, g_mask))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's sync debug mode sees waits in C++ too (blocking "
                    "copies, boolean-mask indexing), which the CPU has none of")
def test_one_gpu_sync_per_step(tmp_path, tiny_model_dir):
    """Packed bf16 on a GPU, every wait counted by torch.cuda.set_sync_debug_mode: the step's one read and
    transformers' one a forward (the first step is left out: lazy CUDA initialisation and the compile may wait)."""
    import warnings

    import slimtune.engine.loop as loop

    real, per_step = loop._step, []

    def step(*args, **kwargs):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return real(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                per_step.append([str(w.message)[:80] for w in seen if "synchroniz" in str(w.message)])

    cfg = lora_run_config(tmp_path, tiny_model_dir, "gpu", max_steps=STEPS, micro_batch_size=2, grad_accum=2,
                          device="cuda", precision="bf16", packing="on")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "_step", step)
        assert cli.main(["train", str(cfg), "--no-progress"]) == 0
    # ours: the one read; transformers': its look at a packed row's position_ids, once a forward (2 micro-batches
    # a step) when a forward has no cache (masking_utils.find_packed_sequence_indices), before the first layer
    assert [len(s) for s in per_step[1:]] == [1 + 2] * (STEPS - 1), per_step


def test_a_training_step_never_walks_the_model_s_modules(tmp_path, tiny_model_dir, monkeypatch):
    """Listing the trained parameters by walking every module (model.parameters()) is host time a GPU step
    paced by the CPU waits for: the step takes them from the optimizer instead, and nothing else inside a step
    walks the modules."""
    import slimtune.engine.loop as loop

    walks, inside = [], [False]
    real_walk, real_step = torch.nn.Module.named_modules, loop._step

    def named_modules(self, *args, **kwargs):
        if inside[0]:
            walks.append(traceback.extract_stack(limit=4)[0].name)
        return real_walk(self, *args, **kwargs)

    def step(*args, **kwargs):
        inside[0] = True
        try:
            return real_step(*args, **kwargs)
        finally:
            inside[0] = False
    monkeypatch.setattr(torch.nn.Module, "named_modules", named_modules)
    monkeypatch.setattr(loop, "_step", step)
    assert cli.main(["train", str(_config(tmp_path, tiny_model_dir, 2)), "--no-progress"]) == 0
    assert len(read_metrics(tmp_path / "run2off" / "metrics.jsonl")) >= STEPS and walks == []
