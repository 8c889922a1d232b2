"""LoRA on a model that is not a causal LM: a BERT encoder inside the user's own nn.Module with two span
heads (linear_1: start, linear_2: end), trained with the user's start/end cross-entropy through slimtune's
public API, scored by span F1, saved in peft's format and reloaded with plain peft.

The synthetic task: random tokens, and the answer span is where the marker tokens are (START opens it,
END closes it, 0-2 random tokens between). Its first half is the training data, its second the test data.

    python examples/bert_span_lora.py                      # a tiny random BERT, on the CPU in seconds
    python examples/bert_span_lora.py --model DIR          # a local BERT folder (config.json + weights)
    python examples/bert_span_lora.py --tutorial-counts    # the tutorial's printout, bert-base shape, meta device

The tutorial this follows printed `trainable params: 589,824 || all params: 110,073,602`: LoRA's count
alone, its freshly initialised heads frozen, so they never trained. slimtune warns about that
(FrozenModuleWarning); here the heads are in modules_to_save, so they train and are saved with the adapter.
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import slimtune  # noqa: E402

START, END = 3, 4  # marker token ids; the random tokens are drawn from 5 up
HEADS = ["linear_1", "linear_2"]


class SpanModel(nn.Module):
    """The user's wrapper: a BERT encoder and one linear head each for the span's start and end."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert
        hidden = bert.config.hidden_size
        self.linear_1 = nn.Linear(hidden, 1)  # start logits
        self.linear_2 = nn.Linear(hidden, 1)  # end logits

    def forward(self, input_ids, attention_mask=None):
        x = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.linear_1(x).squeeze(-1), self.linear_2(x).squeeze(-1)


def tiny_bert(seed: int = 0):
    """A random BERT small enough for the CPU CI: 2 layers, hidden 32."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    return BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0))


def bert_base_config():
    """bert-base-uncased's shape (no weights: the counts need only the shapes)."""
    from transformers import BertConfig

    return BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2)


def synthetic_spans(n: int, vocab: int, length: int = 16, seed: int = 0) -> list[dict]:
    """n examples of `length` tokens; the gold span runs from the START marker to the END marker."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(5, vocab) for _ in range(length)]
        start = rng.randrange(0, length - 3)
        end = start + rng.randrange(1, 4)
        ids[start], ids[end] = START, END
        out.append({"input_ids": ids, "start": start, "end": end})
    return out


def batches(examples: list[dict], size: int = 16) -> list[dict]:
    """Dict batches of tensors, as slimtune.fit takes them with a loss_fn."""
    out = []
    for i in range(0, len(examples), size):
        chunk = examples[i:i + size]
        ids = torch.tensor([e["input_ids"] for e in chunk])
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "start": torch.tensor([e["start"] for e in chunk]), "end": torch.tensor([e["end"] for e in chunk])})
    return out


def span_loss(model, batch: dict) -> torch.Tensor:
    """The user's loss: cross-entropy of the start position plus that of the end position, halved."""
    start_logits, end_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    ce = nn.functional.cross_entropy
    return (ce(start_logits, batch["start"]) + ce(end_logits, batch["end"])) / 2


def f1(gold: tuple[int, int], pred: tuple[int, int]) -> float:
    """Token-level overlap F1 of a predicted span against the gold one (both inclusive)."""
    overlap = min(gold[1], pred[1]) - max(gold[0], pred[0]) + 1
    if overlap <= 0 or pred[1] < pred[0]:
        return 0.0
    precision, recall = overlap / (pred[1] - pred[0] + 1), overlap / (gold[1] - gold[0] + 1)
    return 2 * precision * recall / (precision + recall)


@torch.no_grad()
def span_f1(model, data: list[dict]) -> float:
    """Mean F1 over the batches: the best start, then the best end at or after it."""
    model.eval()
    scores = []
    for b in data:
        start_logits, end_logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        starts = start_logits.argmax(-1)
        positions = torch.arange(end_logits.shape[1])
        ends = end_logits.masked_fill(positions[None] < starts[:, None], float("-inf")).argmax(-1)
        scores += [f1((int(g0), int(g1)), (int(p0), int(p1)))
                   for g0, g1, p0, p1 in zip(b["start"], b["end"], starts, ends)]
    model.train()
    return sum(scores) / len(scores)


def tutorial_counts() -> dict[str, str]:
    """The tutorial's printout from a bert-base-shaped model on the meta device (nothing allocated):
    LoRA r=16 on query/value with the heads frozen (as the tutorial did), then with them trained."""
    from transformers import BertModel

    out = {}
    for key, extra in (("heads frozen", {}), ("heads in modules_to_save", {"modules_to_save": HEADS})):
        with torch.device("meta"):
            model = SpanModel(BertModel(bert_base_config()))
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            model = slimtune.apply_method(model, "lora", r=16, alpha=32, target_modules=["query", "value"], **extra)
        out[key] = slimtune.describe_parameters(model)
        out.update({f"{key}, warning": str(w.message) for w in seen if w.category is slimtune.FrozenModuleWarning})
    return out


def base_model(folder: str | None, out: Path) -> tuple[nn.Module, Path]:
    """The pretrained encoder and the folder it loads from: a local BERT folder, or a tiny random BERT
    written to out/base, so the reload below starts from the same weights, as a user's would."""
    from transformers import BertModel

    if folder:
        return BertModel.from_pretrained(folder), Path(folder)
    bert = tiny_bert()
    bert.save_pretrained(out / "base")
    return bert, out / "base"


def train_span_extractor(out: Path, model_dir: str | None = None, steps: int = 60, lr: float = 1e-2, n: int = 256,
                         log=print) -> dict:
    """Train, evaluate, save and reload; returns the numbers the test checks."""
    bert, base_dir = base_model(model_dir, out)
    data = synthetic_spans(n, bert.config.vocab_size)
    train, test = batches(data[: n // 2]), batches(data[n // 2:])
    torch.manual_seed(1)  # the heads' random init
    model = slimtune.apply_method(SpanModel(bert), "lora", r=8, alpha=16, dropout=0.0,
                                  target_modules=["query", "value"], modules_to_save=HEADS)
    log(f"LoRA r=8 on query/value, heads in modules_to_save: {slimtune.describe_parameters(model)}")
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    f1_before = span_f1(model, test)
    cfg = slimtune.load_config(overrides=[f"train.lr={lr}", f"train.max_steps={steps}", "train.warmup_steps=0",
                                          "train.scheduler=linear", "train.seed=0", f"train.log_every={steps}"])
    result = slimtune.fit(model, train, cfg, loss_fn=span_loss, log=log)
    f1_after = span_f1(model, test)
    log(f"span F1 on the test half: {f1_before:.3f} before, {f1_after:.3f} after training "
        f"(loss {result['losses'][0]:.3f} -> {result['losses'][-1]:.3f})")
    slimtune.save(model, out / "adapter")
    changed = sorted(k for k, v in model.state_dict().items() if not torch.equal(v, before[k]))
    return dict(losses=result["losses"], f1_before=f1_before, f1_after=f1_after, changed=changed,
                params=sorted(before), logit_diff=reload_diff(model, base_dir, out / "adapter", test[0]))


@torch.no_grad()
def reload_diff(model, base_dir: Path, adapter: Path, batch: dict) -> float:
    """Plain peft, no slimtune: a fresh wrapper on the saved base (its heads newly random), the adapter
    loaded onto it (LoRA, and the heads from modules_to_save); max |logit difference| to the trained model."""
    from peft import PeftModel
    from transformers import BertModel

    torch.manual_seed(123)  # other head weights than the trained ones: the adapter must bring them
    fresh = PeftModel.from_pretrained(SpanModel(BertModel.from_pretrained(base_dir)), adapter).eval()
    model.eval()
    got, ref = fresh(batch["input_ids"], batch["attention_mask"]), model(batch["input_ids"], batch["attention_mask"])
    return max(float((a - b).abs().max()) for a, b in zip(got, ref))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="a local BERT folder; default: a tiny random BERT")
    ap.add_argument("--out", help="where the base and adapter go (default: a temporary folder)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--tutorial-counts", action="store_true", help="print the tutorial's counts (bert-base, meta)")
    a = ap.parse_args(argv)
    if a.tutorial_counts:
        for key, text in tutorial_counts().items():
            print(f"{key}: {text}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        res = train_span_extractor(Path(a.out or tmp), a.model, a.steps, a.lr)
    print(f"plain peft reload: max |logit diff| {res['logit_diff']:.2e}; changed tensors: {len(res['changed'])} of "
          f"{len(res['params'])} (LoRA and the heads)")
    return 0 if res["f1_after"] > res["f1_before"] and res["logit_diff"] <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
