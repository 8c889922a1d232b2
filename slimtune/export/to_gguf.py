"""`slimtune export`: a run folder (merged once, in fp32, into a temporary folder with merge's own logit checks) or a
merged folder -> one GGUF file per quant type asked (export/gguf.py writes each), plus an Ollama Modelfile.

Several quant types in one command (`--quant q4_k_m,q8_0`) share the merge and the importance matrix, the two
slow parts before the quantization itself; their files are named after --output with the type added
(`model.gguf` -> `model-q4_k_m.gguf`, `model-q8_0.gguf`).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

from .. import config as config_mod, models, outputs
from ..errors import MissingFileError
from ..runs.adapter import read_config
from . import ExportError
from . import imatrix as imatrix_mod
from .gguf import IMATRIX_QUANTS, QUANTS, check_arch, write_gguf
from .merge import merge
from .ollama import write_modelfile


def quant_list(quant: str) -> list[str]:
    """'q4_k_m,q8_0' -> ['q4_k_m', 'q8_0']: each a known type, none twice."""
    names = [q.strip() for q in quant.split(",") if q.strip()]
    bad = [q for q in names if q not in QUANTS]
    if not names or bad:
        raise ExportError(f"--quant {quant}: choose one or more of {', '.join(QUANTS)} (comma-separated)")
    if len(set(names)) < len(names):
        raise ExportError(f"--quant {quant}: a type is named twice")
    return names


def outputs_for(output: Path, quants: list[str]) -> list[Path]:
    """The file of each quant type: --output itself for one, --output with -TYPE before .gguf for several."""
    return [output] if len(quants) == 1 else [output.with_name(f"{output.stem}-{q}.gguf") for q in quants]


def _base_model_type(folder: Path) -> str:
    """The run's base model_type from its config alone (no weights): refuse early, before merging."""
    cfg = read_config(folder)
    return models.load_config(cfg.model.path, cfg.model.trust_remote_code).model_type


def _check_output(source: Path, output: Path, fmt: str, imatrix: str) -> None:
    """Before anything loads: the GGUF (and an ollama Modelfile beside it) never overwrites what it reads."""
    run = read_config(source) if (source / "config.yaml").is_file() else None
    base = run.model.path if run else (source if (source / "config.json").is_file() else None)  # a merged folder
    data = [run.data.train if run else None, None if imatrix in ("auto", "off") else imatrix]
    outputs.check(output, "export --output", base, data)
    if fmt == "ollama":
        outputs.check(output.with_name("Modelfile"), "export --format ollama: Modelfile beside --output", base, data)


def _write_all(folder: Path, files: list[Path], quants: list[str], log: Callable[[str], None], name: str,
               imatrix: str, run_cfg: config_mod.Config | None = None) -> list[dict]:
    """Each quant type's file from one merged folder, the importance matrix computed once for those that use it."""
    matrix: str | imatrix_mod.Imatrix | None = imatrix
    if len(quants) > 1 and imatrix != "off" and any(q in IMATRIX_QUANTS for q in quants):
        from transformers import AutoTokenizer

        matrix = imatrix_mod.compute(folder, AutoTokenizer.from_pretrained(folder), imatrix, run_cfg, log)
    return [write_gguf(folder, path, q, log, name, matrix, run_cfg) for path, q in zip(files, quants)]


def export(source: str | Path, output: str | Path, quant: str = "f16", fmt: str = "gguf",
           log: Callable[[str], None] = print, imatrix: str = "auto") -> dict:
    """`slimtune export`: a run folder (merged first, in fp32) or a merged folder -> GGUF (+ Modelfile); quant one
    type or several, comma-separated. Returns the first file's result, with every file's under "files"."""
    source, output = Path(source), Path(output)
    quants = quant_list(quant)
    if output.suffix != ".gguf":  # chat, eval and models.load know a GGUF by its suffix
        raise ExportError(f"--output {output}: name the file *.gguf (e.g. {output.with_suffix('.gguf').name})")
    if fmt == "ollama" and len(quants) > 1:
        raise ExportError(f"--format ollama --quant {quant}: a Modelfile names one GGUF file; give one type")
    files = outputs_for(output, quants)
    for path in files:
        _check_output(source, path, fmt, imatrix)
    if (source / "config.yaml").is_file():
        check_arch(_base_model_type(source), f"{source / 'config.yaml'}: model.path")
        with tempfile.TemporaryDirectory(dir=output.parent if output.parent.is_dir() else None,
                                         prefix=".merge-") as tmp:
            merge(source, tmp, "fp32", log=log)
            results = _write_all(Path(tmp), files, quants, log, source.name, imatrix, read_config(source))
    elif (source / "config.json").is_file():
        results = _write_all(source, files, quants, log, "", imatrix)
    else:
        raise MissingFileError(f"{source}: neither a run folder (config.yaml) nor a transformers model folder "
                               "(config.json); give the folder `slimtune train` or `slimtune merge` wrote")
    result = dict(results[0], files=results)
    if fmt == "ollama":
        result["modelfile"] = str(write_modelfile(output, log))
    log(f"try it here first: slimtune chat {files[0]}")
    return result
