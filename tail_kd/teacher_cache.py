"""The teacher's hidden states of a recipe's data, written once, read by every student after.

A sweep trains many students on the same data with the same teacher, and the online teacher
repeats the same forward for each of them. `tail-kd cache-teacher RECIPE`
(tail_kd/cache_teacher.py) runs it once and stores, for every prepared example (T tokens) of the
train and eval sets, the teacher's hidden states that training reads: the final ones [T, H_t]
and, when `loss.hidden_weight` > 0, those at the alignment's other teacher indices
(tail_kd/hidden_alignment.py): S distinct states per token in all (`state_indices`). A run with
`teacher.cached_states: true` then loads no teacher backbone: every item of its datasets carries
its states (`WithTeacherStates`, under the key `teacher_states`, [S, T, H_t]), and the loss and
the metrics make the teacher's logits from them and its lm_head alone (`TeacherHead`), exactly
as from the online teacher's forward.

Hidden states, not logits: the teacher's logits are z = W_t h (then its family's transform,
tail_kd/models/logits.py), so h and the frozen W_t give them exactly, in S H_t numbers per token
instead of V. Disk per token, d_t bytes per element of the teacher's dtype:

    bytes per token = S H_t d_t
    Qwen1.5-1.8B (H_t = 2048), bf16, S = 1:  4096 B = 4 KiB per token, 3.7 TiB per 1e9 tokens
    (its logits would take V d_t = 151,936 x 2 B = 297 KiB per token, 74 times more)

Layout: `<cache_dir>/teacher_states/<fingerprint>/` holds `train.bin` and `eval.bin`, each the
raw row-major array [N, S, T, H_t] of a split (N examples, in the dataset's order) in the
teacher's dtype, read memory-mapped (an example is read from disk when the loader asks for it,
never the whole file), and `manifest.json`: the key, each split's shape and file digest.

The key is what the states depend on (`cache_spec`): the teacher (the digests of its weight
files and config, wherever its folder is; a hub model's id), the data (the tokenised data's
cache entry, which fingerprints the source, the tokenizer and the settings), the sequence
length, the dtype and the stored state indices. The folder is named by the key's fingerprint, and the manifest's key is checked against
the recipe's on reading: a run never reads states of another teacher, data or dtype.

Complete or absent: a write goes into a temporary sibling folder that is renamed into place after
its manifest (`StatesWriter`), under a file lock; an interrupted write leaves only the temporary
folder, which is never read and is removed by the next write; a complete entry is never written
again.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from tail_kd.config import LossConfig, Recipe, RecipeError
from tail_kd.data.cache import file_digest, fingerprint
from tail_kd.hidden_alignment import aligned_pairs
from tail_kd.locks import in_progress_name
from tail_kd.run_dir import fsync, write_json

__all__ = [
    "STATES_KEY",
    "CacheSpec",
    "state_indices",
    "cache_spec",
    "spec_of",
    "problem",
    "StatesWriter",
    "WithTeacherStates",
    "with_teacher_states",
    "TeacherHead",
    "FIX",
]

STATES_KEY = "teacher_states"  # the item's key: [S, T, H_t], the batch's: [B, S, T, H_t]
FORMAT_VERSION = 1  # bump when the layout or the meaning of the files changes
MANIFEST = "manifest.json"
FIX = "write them with `tail-kd cache-teacher RECIPE` (this recipe, the same --set options)"


@dataclass(frozen=True)
class CacheSpec:
    """Where a recipe's teacher states are and what they must be."""

    entry: Path
    key: dict[str, Any]
    shapes: dict[str, tuple[int, int, int, int]]  # split -> (N, S, T, H_t); no eval set: absent
    dtype: torch.dtype
    teacher_dir: str  # where the teacher was read from (for people: the key has its digests)

    @property
    def bytes_per_token(self) -> int:
        """S H_t d_t."""
        _, states, _, hidden = next(iter(self.shapes.values()))
        return states * hidden * self.dtype.itemsize

    def file(self, folder: Path, split: str) -> Path:
        return folder / f"{split}.bin"


def state_indices(loss: LossConfig, teacher_layers: int, student_layers: int) -> tuple[int, ...]:
    """The S teacher hidden states training reads (`output_hidden_states` numbering), each once:
    the final one, then the alignment's other teacher indices when `loss.hidden_weight` > 0 (an
    alignment of the final states, the default, stores nothing more)."""
    indices = [teacher_layers]
    if loss.hidden_weight > 0:
        for teacher, _ in aligned_pairs(loss, teacher_layers, student_layers):
            if teacher not in indices:
                indices.append(teacher)
    return tuple(indices)


def cache_spec(recipe: Recipe, plan, prepared, dtype: torch.dtype) -> CacheSpec:
    """The spec of `recipe`'s teacher states: `plan` its `tail_kd.pair.ModelPlan`, `prepared`
    its `tail_kd.data.prepared.PreparedData`, `dtype` the teacher's."""
    indices = state_indices(
        recipe.loss,
        plan.teacher_config.num_hidden_layers,
        plan.student_config.num_hidden_layers,
    )
    key = {
        "format": FORMAT_VERSION,
        "teacher": _teacher_identity(plan.teacher_dir),
        "data": prepared.cache_path.name,
        "seq_len": recipe.data.seq_len,
        "dtype": _dtype_name(dtype),
        "states": list(indices),
    }
    hidden = plan.teacher_config.hidden_size
    shapes = {
        split: (len(dataset), len(indices), recipe.data.seq_len, hidden)
        for split, dataset in (("train", prepared.train), ("eval", prepared.eval))
        if dataset is not None
    }
    entry = Path(recipe.cache_dir) / "teacher_states" / fingerprint(key)
    return CacheSpec(entry, key, shapes, dtype, str(plan.teacher_dir))


def spec_of(recipe: Recipe) -> CacheSpec:
    """`cache_spec` from the recipe alone: its models planned, its data loaded from the cache
    (both built first if missing), the teacher's dtype on the recipe's device. No weights load."""
    from tail_kd.data.prepared import prepare_datasets
    from tail_kd.deepspeed_config import model_dtype
    from tail_kd.distributed import resolve_device
    from tail_kd.pair import plan_models

    plan = plan_models(recipe)
    prepared = prepare_datasets(recipe.data, plan.tokenizer, recipe.data.cache_dir, recipe.seed)
    dtype = model_dtype(recipe.teacher.dtype, resolve_device(recipe.device))
    return cache_spec(recipe, plan, prepared, dtype)


def _dtype_name(dtype: torch.dtype) -> str:
    """float32, bfloat16."""
    return str(dtype).removeprefix("torch.")


def _teacher_identity(teacher_dir: str) -> dict[str, Any]:
    """What identifies a teacher's hidden states: the size and sampled checksum
    (`tail_kd.data.cache.file_digest`) of each weight file and of the config of a local folder,
    so that a copied folder is the same teacher; a hub model's id."""
    folder = Path(teacher_dir)
    if not folder.is_dir():
        return {"hub": teacher_dir}
    patterns = ("config.json", "*.safetensors", "pytorch_model*.bin")
    files = sorted(file for pattern in patterns for file in folder.glob(pattern))
    return {file.name: file_digest(file) for file in files}


def problem(spec: CacheSpec) -> str | None:
    """Why `spec`'s entry cannot be read (absent, from an interrupted write, written for other
    inputs, damaged), or None if it can."""
    try:
        manifest = json.loads((spec.entry / MANIFEST).read_text())
    except FileNotFoundError:
        leftovers = sorted(spec.entry.parent.glob(f".{spec.entry.name}.tmp-*"))
        interrupted = f" ({leftovers[0]} is an interrupted write, not used)" if leftovers else ""
        return f"no teacher states in {spec.entry}{interrupted}"
    except (OSError, ValueError) as error:
        return f"{spec.entry / MANIFEST} is unreadable ({error})"
    written = manifest.get("key") if isinstance(manifest, dict) else None
    if written != spec.key:
        differ = [
            name
            for name in spec.key
            if not isinstance(written, dict) or written.get(name) != spec.key[name]
        ]
        return (
            f"{spec.entry / MANIFEST} was written for another {', '.join(differ) or 'key'} than "
            "this recipe's"
        )
    for split, shape in spec.shapes.items():
        written = manifest.get("splits", {}).get(split)
        if written is None or tuple(written["shape"]) != shape:
            return (
                f"{spec.entry}: the {split} states have shape "
                f"{None if written is None else written['shape']}, this recipe needs {list(shape)}"
            )
        try:
            if file_digest(spec.file(spec.entry, split)) != written["digest"]:
                return f"{spec.file(spec.entry, split)} does not match its manifest (damaged)"
        except FileNotFoundError:
            return f"{spec.file(spec.entry, split)} is missing"
    return None


class StatesWriter:
    """Writes a spec's entry: `begin` (one process), `write` rows (any process, any order),
    `commit` (one process, after every `write` finished: manifest, then rename into place).

    The files are preallocated in full by `begin`, so processes write their rows independently
    (`os.pwrite` at row offsets) into the same files, on a filesystem they share.
    """

    def __init__(self, spec: CacheSpec, folder: Path):
        self.spec = spec
        self.folder = Path(folder)

    @classmethod
    def begin(cls, spec: CacheSpec) -> StatesWriter:
        """A fresh temporary folder beside the entry with the files at full size. Call it holding
        the entry's lock (`lock_path`): leftovers of interrupted writes are removed here."""
        for stale in spec.entry.parent.glob(f".{spec.entry.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        folder = in_progress_name(spec.entry, prefix=".")
        folder.mkdir(parents=True)
        for split, shape in spec.shapes.items():
            with open(spec.file(folder, split), "wb") as file:
                file.truncate(int(np.prod(shape)) * spec.dtype.itemsize)
        return cls(spec, folder)

    @staticmethod
    def lock_path(spec: CacheSpec) -> Path:
        spec.entry.parent.mkdir(parents=True, exist_ok=True)
        return spec.entry.with_name(spec.entry.name + ".lock")

    def write(self, split: str, start: int, states: Tensor) -> None:
        """Rows start.. of `split`: `states` [B, S, T, H_t] in the spec's dtype (`sync` makes them
        durable)."""
        _, *row_shape = self.spec.shapes[split]
        if tuple(states.shape[1:]) != tuple(row_shape) or states.dtype != self.spec.dtype:
            raise ValueError(
                f"{split}: expected rows of {row_shape} {self.spec.dtype}, got "
                f"{list(states.shape)} {states.dtype}"
            )
        data = memoryview(states.detach().cpu().contiguous().view(torch.uint8).numpy()).cast("B")
        offset = start * int(np.prod(row_shape)) * self.spec.dtype.itemsize
        fd = os.open(self.spec.file(self.folder, split), os.O_WRONLY)
        try:
            while data:
                written = os.pwrite(fd, data, offset)
                data, offset = data[written:], offset + written
        finally:
            os.close(fd)

    def sync(self) -> None:
        """This process's writes on disk (call it before `commit` is called anywhere)."""
        for split in self.spec.shapes:
            fsync(self.spec.file(self.folder, split))

    def commit(self) -> None:
        """The manifest, then the folder renamed into the entry (it must not exist yet)."""
        splits = {
            split: {"shape": list(shape), "digest": file_digest(self.spec.file(self.folder, split))}
            for split, shape in self.spec.shapes.items()
        }
        manifest = {
            "format": FORMAT_VERSION,
            "key": self.spec.key,
            "teacher_dir": self.spec.teacher_dir,
            "dtype": _dtype_name(self.spec.dtype),
            "splits": splits,
            "bytes_per_token": self.spec.bytes_per_token,
        }
        write_json(self.folder / MANIFEST, manifest)
        os.rename(self.folder, self.spec.entry)


class WithTeacherStates:
    """A dataset whose item i is the wrapped dataset's, plus `STATES_KEY`: row i of the states
    file [S, T, H_t] (read from disk on access). Length and order are the wrapped dataset's, so
    the loader's order and resume positions are unchanged."""

    def __init__(self, dataset: Sequence[Mapping[str, Tensor]], spec: CacheSpec, split: str):
        self.dataset = dataset
        self.dtype = spec.dtype
        bits = np.dtype(f"<i{spec.dtype.itemsize}")  # the raw bytes; viewed as `dtype` per item
        file = spec.file(spec.entry, split)
        self.rows = np.memmap(file, dtype=bits, mode="r", shape=spec.shapes[split])

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        states = torch.from_numpy(np.array(self.rows[index])).view(self.dtype)
        return {**self.dataset[index], STATES_KEY: states}


def with_teacher_states(spec: CacheSpec, train, eval_set) -> tuple[WithTeacherStates, Any]:
    """The train and eval datasets (eval may be None) with their teacher states; RecipeError
    naming the field and the fix when the entry cannot be read."""
    why = problem(spec)
    if why is not None:
        raise RecipeError(f"teacher.cached_states: {why}; {FIX}")
    wrapped = [
        None if dataset is None else WithTeacherStates(dataset, spec, split)
        for split, dataset in (("train", train), ("eval", eval_set))
    ]
    return wrapped[0], wrapped[1]


class TeacherHead(nn.Module):
    """A teacher reduced to what training needs beside its cached states: its lm_head (for tied
    models the input embedding, the same parameter) and its config (the logit transform, the
    widths and layers the alignment reads). Everything the loss, the head sources and the
    metrics ask a teacher for (`get_output_embeddings`, `config`) it answers as the whole model.

    It is placed like the whole teacher (`parallel.teacher_placement`, tail_kd/placement.py), and
    the head sources (tail_kd/heads.py) read it unchanged: in a ZeRO-3 inference engine each rank
    keeps V H_t / N of it, gathered around each forward or, with vocab-parallel heads, its row
    shard read once from the partitions; replicated, every rank holds it whole.
    """

    def __init__(self, teacher: nn.Module):
        super().__init__()
        self.config = teacher.config
        self.lm_head = teacher.get_output_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head
