"""A run folder: the adapter in peft's own format (or, for full/freeze/bitfit, the trained parameters),
the resolved config.yaml and metrics.jsonl.

`peft.PeftModel.from_pretrained(base, folder)` loads the adapter with no slimtune code, and so does
`AutoPeftModelForCausalLM.from_pretrained(folder)`: adapter_config.json's base_model_name_or_path is the
base's path, for the embedded model its converted folder on this machine. slimtune's own `load_run` reads
config.yaml to find the base model and the chat template; there a run on the embedded model records
model.path "embedded", which `models.resolve` finds on any machine with slimtune.
`check_run` names what a folder lacks before any model loads (chat, generate, eval, the web app), and
`load_for_inference` loads a run folder, or an exported .gguf file, as chat and generate answer with it.

A run folder is untrusted input: its config.yaml never switches on trust_remote_code (only the person
running the command does, with --trust-remote-code: slimtune/trust.py), and pickled adapters load only as
plain tensors.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

from safetensors import SafetensorError

from .. import config as config_mod
from .. import methods, models, trust
from ..engine import checkpoint, sharded
from ..engine.precision import base_dtype_name
from ..errors import DamagedFileError, MissingFileError
from ..methods import parts
from ..methods.quant import quantization_config

# the files of a run folder that load_run reads (checkpoints aside)
READS = ("config.yaml", "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", parts.PARTS)


def save(model, cfg, out_dir: Path, weights: dict | None = None) -> None:
    """The method's artifact (peft adapter, or our trained parts) plus the resolved config.yaml.
    weights: the trainable parameters whole, when the model's own are sharded."""
    out_dir.mkdir(parents=True, exist_ok=True)
    methods.save(model, out_dir, weights)  # peft's save also names the base portably (methods/lora.py)
    (out_dir / "config.yaml").write_text(config_mod.dump(cfg), encoding="utf-8")


def read_config(folder: Path) -> config_mod.Config:
    path = Path(folder) / "config.yaml"
    if not path.is_file():
        raise MissingFileError(f"{folder}: no config.yaml; give a folder written by `slimtune train`")
    return config_mod.load(path)  # its YAML errors too as one ConfigError naming the file, not a traceback


def _adapter(base, folder: Path):
    """The run's trained model: peft adapter or our trained parts on the base."""
    from peft import PeftModel

    if (folder / "adapter_config.json").is_file():
        try:
            return PeftModel.from_pretrained(base, folder)
        except pickle.UnpicklingError as err:  # adapter_model.bin with more than tensors
            raise models.UnsafeFileError(models.pickle_refused(folder / "adapter_model.bin", err)) from None
        except (SafetensorError, json.JSONDecodeError) as err:  # a save cut short, or a file damaged since
            raise DamagedFileError(f"{folder}: its adapter files cannot be read ({type(err).__name__}: {err}); "
                                   "restore them or train the run again") from None
    if parts_saved(folder):
        return load_parts(base, folder)
    raise MissingFileError(f"{folder}: neither adapter_config.json nor {parts.PARTS}; the run did not "
                           "finish saving")


def parts_saved(folder: Path) -> bool:
    """The folder holds our methods' trained parts: the file, or a checkpoint's DCP shards (engine/sharded.py)."""
    return (Path(folder) / parts.PARTS).is_file() or sharded.present(folder)


def load_parts(base, folder: Path):
    """methods.parts.load, and for a checkpoint of a full fine-tuning on several GPUs (no parts file, DCP
    shards instead) the weights consolidated from its shards; the base model is changed in place."""
    if not (Path(folder) / parts.PARTS).is_file() and sharded.present(folder):
        sharded.load_weights(folder, dict(base.named_parameters()))
        return base
    return parts.load(base, folder)


def load_run(folder: str | Path, device: str = "cpu", quantized: bool = True, dtype: str | None = None,
             trust_remote_code: bool = False):
    """(trained model, tokenizer, config) from a run folder, in eval mode. quantized=False loads a
    qlora run's base in full precision (for merging); dtype: the base's dtype ("fp32"...) instead of the
    run's. trust_remote_code: the user's own flag; the run's config.yaml never turns it on."""
    folder = Path(folder)
    cfg = read_config(folder)
    # what this process allowed, for anything downstream: the user's flag, never the run's config.yaml
    cfg.model.trust_remote_code = trust.decide(cfg, folder / "config.yaml", trust_remote_code, run=True)
    quant = quantization_config(cfg.method, cfg.train.precision) if quantized else None  # as the run trained
    dtype = dtype or base_dtype_name(cfg, device)
    base, tokenizer = models.load(cfg.model.path, dtype, cfg.model.trust_remote_code, device, quant)
    model = _adapter(base, folder)
    model.eval()
    return model, tokenizer, cfg


def check_run(folder: str | Path) -> None:
    """Before any model loads: a run folder that never trained, or stopped before saving its adapter, is
    named for what it is (with the checkpoint to use instead), not as a missing file."""
    out = Path(folder)
    if not out.is_dir():
        raise MissingFileError(f"{out}: no such run folder (give the train.output_dir of a `slimtune train` run)")
    if (out / "adapter_config.json").is_file() or parts_saved(out):
        return
    last = checkpoint.latest(out)
    if last is not None:
        raise MissingFileError(f"{out}: training stopped before saving the final adapter; its newest checkpoint is "
                               f"{last}: pass that folder instead, or `slimtune train {out / 'config.yaml'} "
                               "--resume` to finish the run")
    if (out / "config.yaml").is_file() and not (out / "metrics.jsonl").is_file():
        raise MissingFileError(f"training never started in {out} (no metrics.jsonl, no checkpoint): its config.yaml "
                               "was written, then the run was refused or stopped before its first step (see "
                               f"that command's error); run `slimtune train {out / 'config.yaml'}` first")
    if (out / "config.yaml").is_file():
        raise MissingFileError(f"{out}: training started (metrics.jsonl) but saved no adapter and no checkpoint; "
                               f"run `slimtune train {out / 'config.yaml'} --overwrite` again")
    raise MissingFileError(f"{out}: not a slimtune run folder (no config.yaml, adapter or checkpoint)")


def load_for_inference(args):
    """(model in eval mode, tokenizer, config, device) of a run folder or an exported .gguf file, as chat and
    generate load it; args: their flags (folder, device, trust_remote_code)."""
    device = models.pick_device(args.device)
    if str(args.folder).endswith(".gguf"):  # an exported file: its own chat template, no run config
        model, tokenizer = models.load(args.folder, device=device)
        return model.eval(), tokenizer, config_mod.load(None, [f"model.path={args.folder}"]), device
    check_run(args.folder)
    model, tokenizer, cfg = load_run(args.folder, device, trust_remote_code=args.trust_remote_code)
    return model, tokenizer, cfg, device
