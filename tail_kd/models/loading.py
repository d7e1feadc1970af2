"""Turn a recipe's model reference into a loadable Hugging Face folder, and load it.

A reference is one of
- a local Hugging Face folder (has `config.json`): used as it is;
- a `.gguf` file, or a folder plus `gguf_file`: converted once into a float32 safetensors folder
  under `<cache_dir>/gguf/`, which is then used (transformers cannot save a GGUF-loaded model, and
  re-reading the GGUF costs ~20 s per process);
- anything else that looks like `name` or `owner/name`: a hub id, passed through unchanged.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import re
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from tail_kd.models.cache import build_once

logger = logging.getLogger(__name__)

# Hub ids are `name` or `owner/name`; anything else (absolute, ./relative, a/b/c) is a local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_model_dir(path: str, cache_dir: str | Path, gguf_file: str | None = None) -> str:
    """Return a folder (or hub id) that `from_pretrained` can load for the model reference `path`.

    `gguf_file` names a `.gguf` inside the folder (or hub repo) `path`. GGUF models are converted
    on first use and cached under `cache_dir`; later calls, from any process, reuse the conversion.
    Raises FileNotFoundError for a missing local path and ValueError for an unreadable GGUF file.
    """
    gguf_path = find_gguf(path, gguf_file)
    if gguf_path is not None:
        return str(convert_gguf(gguf_path, cache_dir))
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise FileNotFoundError(
                f"model folder {local} has no config.json: point the model path at a Hugging Face "
                f"model folder, or set gguf_file to the .gguf file inside it"
            )
        return str(local)
    if _looks_like_path(path):
        resolved = local.resolve()
        where = "" if str(resolved) == path else f" (looked for {resolved})"
        raise FileNotFoundError(f"model path {path} does not exist{where}")
    return path


def convert_gguf(gguf_path: str | Path, cache_dir: str | Path) -> Path:
    """Convert a GGUF model to a float32 safetensors folder under `cache_dir`, once; return it.
    Concurrent callers wait for the one that converts."""
    gguf_path = Path(gguf_path).resolve()
    target = gguf_conversion(gguf_path, cache_dir)
    return build_once(target, lambda out: _convert_gguf_into(gguf_path, out))


def gguf_conversion(gguf_path: Path, cache_dir: str | Path) -> Path:
    """Where `convert_gguf` puts the conversion of `gguf_path` (made or not yet):
    `<cache_dir>/gguf/<file stem>-<hash of the file's size and mtime>`, so that a changed file
    gets a fresh conversion."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return Path(cache_dir) / "gguf" / f"{gguf_path.stem}-{key}"


# What a training job reads of a hub model: config, tokenizer, generation config, weights.
_METADATA_FILES = ["*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
_WEIGHT_FILES = ["*.safetensors"]


def is_hub_id(path: str, gguf_file: str | None = None) -> bool:
    """Whether a model reference names a model on the hub (not a local folder or file)."""
    return gguf_file is None and not Path(path).expanduser().exists() and not _looks_like_path(path)


def fetch_from_hub(repo_id: str, *, weights: bool, local_only: bool = False) -> str:
    """Download a hub model's config, tokenizer and (`weights`) safetensors into the Hugging Face
    cache, where `from_pretrained` then finds them offline (HF_HUB_OFFLINE=1); with `local_only`,
    only check that they are there (OSError if not). Returns the local snapshot folder."""
    from huggingface_hub import snapshot_download

    patterns = _METADATA_FILES + (_WEIGHT_FILES if weights else [])
    return snapshot_download(repo_id, allow_patterns=patterns, local_files_only=local_only)


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a resolved model folder or hub id."""
    return AutoTokenizer.from_pretrained(str(model_dir))


def load_causal_lm(model_dir: str | Path, dtype: torch.dtype | str) -> PreTrainedModel:
    """Load a causal LM from a resolved model folder or hub id with weights in `dtype`."""
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)


def find_gguf(path: str, gguf_file: str | None) -> Path | None:
    """The local GGUF file that `path` (+ `gguf_file`) refers to, or None if it is not a GGUF."""
    local = Path(path).expanduser()
    if gguf_file is not None:
        if local.is_dir():
            candidate = local / gguf_file
            if not candidate.is_file():
                raise FileNotFoundError(f"gguf_file {gguf_file!r} not found in {local}")
            return candidate
        if _looks_like_path(path):
            raise FileNotFoundError(
                f"folder {path} (holding gguf_file {gguf_file!r}) does not exist"
            )
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id=path, filename=gguf_file))
    if path.endswith(".gguf"):
        if not local.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        return local
    return None


def _looks_like_path(path: str) -> bool:
    """True for references that cannot be hub ids, so that a missing one is a missing file."""
    return path.endswith(".gguf") or _HUB_ID.match(path) is None


def _convert_gguf_into(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise `gguf_path` with transformers and save model + tokenizer as a folder `out_dir`.

    transformers refuses to save a GGUF-loaded model, so its weights move into a fresh model built
    from the same config without `quantization_config`; `strict=True` proves nothing was dropped.
    """
    _check_gguf_readable(gguf_path)
    logger.info("converting %s to %s (once; later runs reuse it)", gguf_path, out_dir)
    folder, name = str(gguf_path.parent), gguf_path.name
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = copy.deepcopy(gguf_model.config)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out_dir)


def _check_gguf_readable(gguf_path: Path) -> None:
    """Raise ValueError naming `gguf_path` if its header and tensor table cannot be parsed."""
    from gguf import GGUFReader

    try:
        GGUFReader(gguf_path)
    except Exception as error:  # the reader raises ValueError, struct.error, IndexError, ...
        raise ValueError(
            f"{gguf_path} is not a readable GGUF file ({error}); re-download it or point the "
            f"model path at a Hugging Face folder instead"
        ) from error
