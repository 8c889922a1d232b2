"""Resume is exact: a run killed (SIGKILL) or stopped (SIGINT/SIGTERM) at any step and resumed gives the same
loss at every step and the same final adapter as an uninterrupted run (fp32 on the CPU: bit-identical)."""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import lora_run_config, write_jsonl
from slimtune import cli
from slimtune.runs import checkpoint
from slimtune.runs.metrics_log import read_metrics

STEPS = 24


def _config(tmp: Path, model_dir: Path, name: str, **train) -> Path:
    """28 training records, 8 per step: 24 steps cross six epochs (each a new shuffle); dropout on, so the
    dropout masks (torch's RNG) must resume too; warm-up + cosine, so the schedule must."""
    return lora_run_config(tmp, model_dir, name, **{"max_steps": STEPS, "micro_batch_size": 4, "grad_accum": 2,
                                                    "scheduler": "cosine", "save_every": 1,
                                                    "keep_checkpoints": 2, **train})


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def _logged_step(run: Path) -> int:
    """The last step in metrics.jsonl (a line being written is ignored)."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return 0
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.endswith("}")]
    return max((r["step"] for r in rows if "loss" in r), default=0)


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter_model.safetensors")


def _train(cfg: Path, *extra: str) -> subprocess.Popen:
    # one thread each: four runs share the CPU, and every run (the reference too) computes alike
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "slimtune", "train", str(cfg), "--no-progress", *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill_at(victims: dict[str, tuple[subprocess.Popen, Path, int]], timeout: float = 120) -> None:
    """SIGKILL each run once metrics.jsonl shows its target step (mid-step or mid-checkpoint: either way)."""
    waiting, deadline = dict(victims), time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        for name, (proc, run, target) in list(waiting.items()):
            if _logged_step(run) >= target:
                assert proc.poll() is None, f"{name} finished before its kill at step {target}"
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                del waiting[name]
            elif proc.poll() is not None:
                pytest.fail(f"{name} exited early:\n{proc.stdout.read()}")
        time.sleep(0.005)
    assert not waiting, f"runs never reached their kill step: {list(waiting)}"


def test_sigkill_at_random_steps_then_resume_equals_uninterrupted_run(tmp_path, tiny_model_dir):
    # three kill points, one drawn from each third of the run so that they differ
    rng = random.Random()
    targets = {f"killed{i}": rng.randint(2 + 7 * i, 7 + 7 * i) for i in range(3)}
    ref = _train(_config(tmp_path, tiny_model_dir, "ref"))
    victims = {n: (_train(_config(tmp_path, tiny_model_dir, n)), tmp_path / n, k) for n, k in targets.items()}
    _kill_at(victims)
    out, _ = ref.communicate(timeout=120)
    assert ref.returncode == 0, out
    resumed = {n: _train(tmp_path / f"{n}.yaml", "--resume") for n in targets}
    starts = {}
    for name, proc in resumed.items():
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
        found = re.search(r"resuming from \S+step-(\d+) at step (\d+) of 24", out)
        assert found, out
        starts[name] = int(found.group(2))
        assert 0 < starts[name] <= targets[name], (targets, starts)
    assert len(set(starts.values())) == 3, (targets, starts)

    expected, weights = _losses(tmp_path / "ref"), _adapter(tmp_path / "ref")
    assert [s for s, _ in expected] == list(range(1, STEPS + 1))
    for name in targets:
        run = tmp_path / name
        assert _losses(run) == expected, (name, starts[name])  # every step once, each loss bit-identical
        got = _adapter(run)
        assert got.keys() == weights.keys() and all(torch.equal(got[k], weights[k]) for k in weights), name
        evals = [r["eval_loss"] for r in read_metrics(run / "metrics.jsonl") if "eval_loss" in r]
        assert evals == [r["eval_loss"] for r in read_metrics(tmp_path / "ref" / "metrics.jsonl") if "eval_loss" in r]
        assert not list((run / checkpoint.ROOT).glob(".tmp-*"))  # what a kill half-wrote is gone
        assert _tensorboard_losses(run) == [loss for _, loss in expected]
    kept = sorted(p.name for p in (tmp_path / "ref" / checkpoint.ROOT).iterdir())
    assert kept == ["step-000023", "step-000024"]  # keep_checkpoints=2


def _tensorboard_losses(run: Path) -> list[float]:
    """train/loss as TensorBoard reads it: a resumed run's purge_step drops what the killed one logged
    after its checkpoint, so every step appears once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run))
    acc.Reload()
    events = acc.Scalars("train/loss")
    assert [e.step for e in events] == list(range(1, STEPS + 1))
    return [pytest.approx(e.value, rel=1e-6) for e in events]  # TensorBoard keeps float32


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    """An uninterrupted run in this process (the stop tests below run here too: same threads, same numbers)."""
    tmp = tmp_path_factory.mktemp("ref")
    cfg = _config(tmp, tiny_model_dir, "ref", max_steps=12, save_every=0)
    assert cli.main(["train", str(cfg), "--no-progress"]) == 0
    return tmp / "ref"


EVALS = {"eval_every": 3, "eval_generate": True, "eval_max_records": 2, "eval_max_new_tokens": 4}


@pytest.mark.parametrize("sig, how, evals", [(signal.SIGTERM, "--resume", {}), (signal.SIGINT, "train.resume=auto", {}),
                                             (signal.SIGTERM, "--resume", EVALS)], ids=["term", "int", "term-evals"])
def test_signal_saves_at_step_boundary_and_resume_is_exact(tmp_path, tiny_model_dir, reference, monkeypatch,
                                                           capsys, sig, how, evals):
    import slimtune.engine.loop as loop

    real, calls = loop.step, []

    def signalled_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), sig)  # arrives mid-step, as Ctrl-C does
        return real(*args, **kwargs)

    cfg = _config(tmp_path, tiny_model_dir, "run", max_steps=12, save_every=0, **evals)  # the reference: none
    handler = signal.getsignal(sig)
    monkeypatch.setattr(loop, "step", signalled_step)
    assert cli.main(["train", str(cfg), "--no-progress"]) == 128 + sig.value  # 130 / 143: stopped, not finished
    monkeypatch.setattr(loop, "step", real)
    assert signal.getsignal(sig) == handler  # training's handler is gone again
    run = tmp_path / "run"
    assert [p.name for p in (run / checkpoint.ROOT).iterdir()] == ["step-000005"]  # save_every=0: only that one
    assert not (run / "adapter_model.safetensors").exists()
    assert f"{sig.name}: stopped after step 5 of 12" in capsys.readouterr().out
    assert len(_losses(run)) == 5

    assert cli.main(["train", str(cfg), how, "--no-progress"]) == 0
    assert _losses(run) == _losses(reference)
    got, want = _adapter(run), _adapter(reference)
    assert all(torch.equal(got[k], want[k]) for k in want)
    if evals:  # evaluating (generation too) changed no training number; each eval row is there once
        rows = [r for r in read_metrics(run / "metrics.jsonl") if "eval_loss" in r]
        assert [r["step"] for r in rows] == [0, 3, 6, 9, 12] and all("eval_f1" in r for r in rows)
        ref = [r["eval_loss"] for r in read_metrics(reference / "metrics.jsonl") if "eval_loss" in r]
        assert [rows[0]["eval_loss"], rows[-1]["eval_loss"]] == ref


def test_checkpoint_folder_is_a_run_folder_and_half_written_ones_are_never_picked(reference):
    from slimtune.trained import load_run

    final = checkpoint.latest(reference)
    assert final is not None and final.name == "step-000012"
    assert _adapter(final).keys() == _adapter(reference).keys()
    model, _, saved = load_run(final)  # chat, merge and generate take a checkpoint folder as a run's
    assert saved.train.max_steps == 12 and model is not None
    root = reference / checkpoint.ROOT
    shutil.copytree(final, root / ".tmp-step-000013-999")  # a kill during the write, before the rename
    shutil.copytree(final, root / "step-000014")
    (root / "step-000014" / checkpoint.DONE).unlink()  # a folder that never got its marker
    assert checkpoint.latest(reference) == final
    checkpoint.clean(reference)
    assert not (root / ".tmp-step-000013-999").exists()
    shutil.rmtree(root / "step-000014")


def test_resume_refuses_a_different_config_and_overwrite_with_resume(reference, capsys):
    cfg = reference.parent / "ref.yaml"
    assert cli.main(["train", str(cfg), "train.weight_decay=0.5", "--no-progress", "--resume"]) == 2
    err = capsys.readouterr().err  # train.lr may change (checkpoint.FREE_KEYS): test_guards resumes at a new one
    assert "holds a different run" in err and "train.weight_decay: 0.0 there, 0.5 now" in err
    assert cli.main(["train", str(cfg), "--no-progress", "--resume", "--overwrite"]) == 2
    assert "choose one" in capsys.readouterr().err
    assert cli.main(["train", str(cfg), "--no-progress"]) == 2
    assert "pass --resume to continue that run" in capsys.readouterr().err


def test_resume_refuses_changed_data(tmp_path, tiny_model_dir, capsys):
    cfg = _config(tmp_path, tiny_model_dir, "run", max_steps=2)
    assert cli.main(["train", str(cfg), "--no-progress"]) == 0
    write_jsonl(tmp_path / "train.jsonl", [{"instruction": f"Other question {i}?", "output": f"Answer {i}."}
                                           for i in range(32)])
    assert cli.main(["train", str(cfg), "--no-progress", "--resume"]) == 2
    assert "the training data differ from those it was trained on" in capsys.readouterr().err


def test_pissa_checkpoints_each_hold_a_converted_adapter(tmp_path, tiny_model_dir):
    """PiSSA's save converts against its initial adapter and then deletes it: checkpoints must leave it
    for the saves after them, so every one (and the final adapter) is the plain rank-2r LoRA."""
    cfg = _config(tmp_path, tiny_model_dir, "run", max_steps=3, keep_checkpoints=0)
    tree = yaml.safe_load(cfg.read_text())
    tree["method"]["name"] = "pissa"
    cfg.write_text(yaml.safe_dump(tree))
    assert cli.main(["train", str(cfg), "--no-progress"]) == 0
    run = tmp_path / "run"
    folders = [p for _, p in checkpoint.complete(run / checkpoint.ROOT)]
    assert [p.name for p in folders] == ["step-000001", "step-000002", "step-000003"]
    for folder in folders + [run]:
        assert json.loads((folder / "adapter_config.json").read_text())["r"] == 8, folder
    final, last = _adapter(run), _adapter(folders[-1])
    assert all(torch.equal(final[k], last[k]) for k in final)


def test_resume_with_another_train_loss_uses_the_new_one(tmp_path, tiny_model_dir, monkeypatch):
    """train.loss may change on a resume (checkpoint.FREE_KEYS): the resumed steps compute the new loss, and the
    run reports it, not the checkpoint's (whose result dict once restored the old choice over the fresh one);
    the tallies the checkpoint holds (its "result" entry) go on."""
    import slimtune.engine.step as loop  # where each micro-batch's loss is taken
    from slimtune import config as config_mod
    from slimtune.train import from_config as train_run

    real, chunked = loop.token_loss_sum, []

    def spy(model, batch, chunk):
        chunked.append(chunk)  # what each micro-batch's forward was asked to compute
        return real(model, batch, chunk)

    monkeypatch.setattr(loop, "token_loss_sum", spy)
    cfg = _config(tmp_path, tiny_model_dir, "run", max_steps=4, keep_checkpoints=0, loss="plain")
    quiet = dict(show_progress=False, log=lambda *a: None)
    plain = train_run(config_mod.load(cfg), **quiet)
    assert plain["chunked_loss"] is False and chunked == [False] * 8  # 4 steps x grad_accum 2
    run = tmp_path / "run"
    reference = _losses(run)
    for step in (3, 4):  # back to the checkpoint after step 2
        shutil.rmtree(checkpoint.step_folder(run, step))
    saved = torch.load(checkpoint.step_folder(run, 2) / checkpoint.STATE, weights_only=True)["result"]
    assert saved["train_loss"] == reference[1][1] and saved["nan_steps"] == 0 and "chunked_loss" not in saved
    chunked.clear()
    resumed = train_run(config_mod.load(cfg, ["train.loss=chunked"]), resume=True, **quiet)
    assert resumed["chunked_loss"] is True and chunked == [True] * 4  # steps 3 and 4 only
    assert resumed["steps"] == 4 and resumed["start_max_abs"] == plain["start_max_abs"]  # the first run's
    losses = _losses(run)
    assert [s for s, _ in losses] == [1, 2, 3, 4]
    assert losses[:2] == reference[:2]
    for (_, a), (_, b) in zip(losses[2:], reference[2:]):
        assert a == pytest.approx(b, abs=1e-5)
    assert resumed["train_loss"] == losses[-1][1]


def test_resume_reads_a_checkpoint_that_holds_the_old_result_dict(tmp_path, tiny_model_dir):
    """Checkpoints written before the run's state was typed hold the whole result dict (kernel keys, steps,
    precision...) under "result": a resume reads its tallies back and keeps this run's kernel choice."""
    from slimtune import config as config_mod
    from slimtune.train import from_config as train_run

    cfg = _config(tmp_path, tiny_model_dir, "run", max_steps=3, keep_checkpoints=0, loss="plain")
    quiet = dict(show_progress=False, log=lambda *a: None)
    first = train_run(config_mod.load(cfg), **quiet)
    run = tmp_path / "run"
    shutil.rmtree(checkpoint.step_folder(run, 3))
    path = checkpoint.step_folder(run, 2) / checkpoint.STATE
    state = torch.load(path, weights_only=True)
    state["result"] = dict(state["result"], steps=3, precision="fp32", chunked_loss=False, packing="off",
                           fused_lora_layers=0, fused_norm_mlp=0, fused_rope=0, skipped_steps=1,
                           eval_before={"eval_loss": 9.5})  # as the old loop wrote it
    torch.save(state, path)
    resumed = train_run(config_mod.load(cfg, ["train.loss=chunked"]), resume=True, **quiet)
    assert resumed["chunked_loss"] is True and resumed["skipped_steps"] == 1
    assert resumed["eval_before"] == {"eval_loss": 9.5} and "interrupted" not in resumed
    assert resumed["train_loss"] == pytest.approx(first["train_loss"], abs=1e-5)
