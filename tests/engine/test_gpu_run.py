"""GPU-only: a real run prints the measured peak beside the prediction (run through bench/ on the device)."""
from __future__ import annotations

import pytest
import torch

from conftest import write_jsonl
from slimtune import cli

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="measures CUDA memory; needs a GPU")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_gpu_run_prints_measured_beside_predicted(tmp_path, tiny_model_dir, capsys, precision):
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"q{i} " * 20, "output": f"a{i} " * 30}
                                              for i in range(16)])
    assert cli.main(["train", f"model.path={tiny_model_dir}", f"data.train={data}", "data.eval_size=4",
                     f"train.precision={precision}", "train.max_steps=4", "train.device=cuda",
                     f"train.output_dir={tmp_path / 'run'}", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "predicted peak GPU memory:" in out
    line = next(x for x in out.splitlines() if x.startswith("GPU memory: measured peak"))
    assert "predicted" in line
    if precision == "fp16":
        assert "fp16 loss scaling: final scale" in out
