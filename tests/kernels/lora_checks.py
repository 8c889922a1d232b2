"""What tests/kernels/test_lora.py and test_qlora.py share: the tiny model's LoRA setup, one loss-and-gradients
pass, and the check that the fused layers (kernels/lora.py; over a 4-bit base, kernels/qlora.py) give peft's
outputs and every gradient, then peft's own forward back after disable()."""
from __future__ import annotations

import torch

from conftest import make_model
from slimtune import methods
from slimtune.config import MethodConfig
from slimtune.kernels import lora

VOCAB = 300
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_model(arch: str = "llama", base=None, **kw):
    """LoRA (method.* keys in kw: name=qlora...) on all seven projections of a tiny `arch` (or of `base`), with
    B drawn away from 0."""
    cfg = dict(name="lora", r=4, alpha=8, dropout=0.0, target_modules=ALL)
    cfg.update(kw)
    model = methods.apply(make_model(VOCAB, arch) if base is None else base, MethodConfig(**cfg))
    torch.manual_seed(1)
    for n, p in model.named_parameters():  # B starts at 0: give it values so every gradient is tested
        if "lora_B" in n:
            p.data.normal_(0, 0.2)
    return model


def loss_and_grads(model, ids, autocast=False):
    model.zero_grad(set_to_none=True)
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), logits.detach(), grads


def assert_fused_equals_peft(model, n_bias: int, grad_share: float) -> None:
    """fp32: the 14 fused layers' loss and logits within 1e-5 of peft's, each trained tensor's gradient within
    grad_share x its largest entry (28 LoRA matrices plus n_bias trained biases); disable() gives peft's
    forward back bit for bit."""
    ids = torch.randint(0, VOCAB, (2, 37), generator=torch.Generator().manual_seed(0))
    want = loss_and_grads(model, ids)
    assert lora.enable(model) == 14 and lora.enabled(model) == 14
    got = loss_and_grads(model, ids)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    assert abs(float(got[0] - want[0])) < 1e-5
    assert got[2].keys() == want[2].keys() and len(got[2]) == 28 + n_bias
    for name in want[2]:
        scale = float(want[2][name].abs().max())
        assert scale > 0, name
        torch.testing.assert_close(got[2][name], want[2][name], rtol=1e-5, atol=grad_share * scale, msg=name)
    lora.disable(model)
    assert lora.enabled(model) == 0
    assert torch.equal(loss_and_grads(model, ids)[1], want[1])  # peft's own forward again, bit for bit
