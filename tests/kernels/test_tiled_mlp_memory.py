"""What a long record's training step creates, counted op by op on the CPU (a TorchDispatchMode sees every tensor
an op makes in forward, the checkpoint's recompute and backward): under train.tiled_mlp=auto as CUDA resolves it,
the decoder MLP of a record as long as the one an 8B LoRA step ran out of memory on (H100, 24 GiB cap, 33,792
tokens: a 924 MiB tokens x intermediate tensor) makes no tensor of the whole length at the intermediate width, and
the fused LoRA node's backward makes one input-sized tensor, not two. tests/kernels/test_tiled_mlp.py checks the
values; these check the sizes."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from conftest import make_model
from slimtune import config, methods
from slimtune.kernels import lora, select, tiled_mlp

RECORD = 33792  # the record bench/long_context.py's 8B LoRA cell ran out of memory on (2026-12-06)
DEFAULT_MICRO_BATCH = 16 * 1024  # 16 records of up to 1,024 tokens packed in one row (the default workload)


class Created(TorchDispatchMode):
    """The element counts of the tensors ops create: outputs on new memory (a view, detach or in-place op returns
    memory one of its inputs has)."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        held = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in held:
                self.sizes.append(o.numel())
        return out


def _fused_mlp():
    """A tiny Llama's first MLP with fused LoRA layers on its three projections, tiled as auto does on CUDA."""
    model = methods.apply(make_model(300), config.MethodConfig(r=4, alpha=8, dropout=0.0,
                                                               target_modules=["gate_proj", "up_proj", "down_proj"]))
    for name, p in model.named_parameters():  # B starts at 0, which would leave A's gradient 0
        if "lora_B" in name:
            p.data.normal_(0, 0.2, generator=torch.Generator().manual_seed(3))
    assert lora.enable(model, log=lambda _: None) == 6
    assert tiled_mlp.enable(model, select.tiled_mlp_from("auto", "cuda")) == 2
    return model, model.get_base_model().model.layers[0].mlp


def test_auto_slices_the_record_that_ran_out_of_memory_and_leaves_the_default_micro_batch_whole():
    model, mlp = _fused_mlp()
    hidden, inter = mlp.gate_proj.in_features, mlp.gate_proj.out_features  # 64, 128
    assert select.tiled_mlp_from("auto", "cuda") >= DEFAULT_MICRO_BATCH  # the short path keeps one MLP pass
    x = torch.randn(1, RECORD, hidden, generator=torch.Generator().manual_seed(0))
    seen = Created()
    with seen:  # a checkpointed layer: forward, then recompute and backward
        checkpoint(mlp, x, use_reentrant=False).square().sum().backward()
    rows = tiled_mlp.tile_rows(hidden, RECORD)
    assert max(seen.sizes) == RECORD * hidden < RECORD * inter  # x's size (output, gradient): nothing wider
    assert rows == 64 and rows * inter in seen.sizes  # the intermediates, a slice of 64 tokens at a time
    grads = [p.grad for n, p in model.named_parameters() if "layers.0." in n and p.requires_grad]
    assert len(grads) == 6 and all(g is not None and float(g.abs().max()) > 0 for g in grads)


def test_the_fused_lora_backward_makes_one_input_sized_tensor():
    """d loss / d x = g W + (g B s) A: the adapter's term added in place, so down_proj's backward holds one tokens x
    intermediate tensor, not g W and a second one beside it."""
    g = torch.Generator().manual_seed(0)
    n, d_in, d_out, r = 301, 224, 64, 4
    x = torch.randn(n, d_in, generator=g, requires_grad=True)
    w = torch.randn(d_out, d_in, generator=g)
    a, b = torch.randn(r, d_in, generator=g, requires_grad=True), torch.randn(d_out, r, generator=g, requires_grad=True)
    y = lora.lora_linear(x, w, None, a, b, 2.0)
    seen = Created()
    with seen:
        y.backward(torch.randn(n, d_out, generator=g))
    assert seen.sizes.count(n * d_in) == 1
    want = torch.autograd.grad((x @ w.T + 2.0 * (x @ a.T) @ b.T).sum(), x, torch.ones(()))[0]
    torch.testing.assert_close(torch.autograd.grad(lora.lora_linear(x, w, None, a, b, 2.0).sum(), x)[0], want)
