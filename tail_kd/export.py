"""`tail-kd export RUN_DIR OUT_DIR [--step N] [--dtype float32|bfloat16]`: a run's student as a
Hugging Face model folder.

The newest complete checkpoint of the run (or that of step N) is consolidated from its ZeRO-3
shards into one float32 state dict (DeepSpeed's `get_fp32_state_dict_from_zero_checkpoint`, the
same code as the `zero_to_fp32.py` script saved beside every checkpoint), loaded into a student
built from the config the run saved in `RUN_DIR/student/`, and written with `save_pretrained`
(safetensors) together with the tokenizer and generation config, so that

    AutoModelForCausalLM.from_pretrained(OUT_DIR)

loads it. Tied embeddings stay tied: DeepSpeed lists a tied lm_head under both names, pointing
at one tensor, and the model built from the config ties them the same way. OUT_DIR is written
under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Sequence

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
)

from tail_kd.checkpoint import DEEPSPEED_TAG
from tail_kd.exit_status import EXIT_USAGE, UsageError
from tail_kd.models.cache import apply_umask
from tail_kd.run_dir import STUDENT_DIR, find_checkpoint

__all__ = ["WRAPPER_PREFIX", "save_student_spec", "load_student", "export", "main"]

WRAPPER_PREFIX = "student."  # parameter names inside the training engine (StudentWithLoss.student)


def save_student_spec(
    run_dir: str | os.PathLike, config, tokenizer, generation_config=None
) -> Path:
    """Write what export needs besides the weights (config, tokenizer, generation config)."""
    folder = Path(run_dir) / STUDENT_DIR
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if generation_config is not None:
        generation_config.save_pretrained(folder)
    return folder


def load_student(
    run_dir: str | os.PathLike, step: int | None = None
) -> tuple[PreTrainedModel, int]:
    """(student with the checkpoint's float32 weights, its step) for a run directory."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run_dir = Path(run_dir)
    spec = run_dir / STUDENT_DIR
    if not (spec / "config.json").is_file():
        raise FileNotFoundError(
            f"{spec} has no config.json: {run_dir} is not a tail-kd run directory"
        )
    checkpoint = find_checkpoint(run_dir, step)
    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.path), tag=DEEPSPEED_TAG)
    # The student's own weights; the engine's other modules (the hidden-state alignment's
    # projections) are training aids.
    state = {
        name.removeprefix(WRAPPER_PREFIX): tensor
        for name, tensor in state.items()
        if name.startswith(WRAPPER_PREFIX)
    }
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(spec), dtype=torch.float32)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise UsageError(
            f"{checkpoint.path} does not match the student config in {spec}: {error}"
        ) from None
    return model, checkpoint.step


def export(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    step: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write the run's student (newest complete checkpoint, or `step`) to `out_dir`; return it."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(
            f"{out_dir} exists and is not empty: choose another OUT_DIR or remove it"
        )
    model, saved_step = load_student(run_dir, step)
    spec = run_dir / STUDENT_DIR
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(dtype).save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(spec).save_pretrained(tmp)
    if (spec / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(spec).save_pretrained(tmp)
    apply_umask(tmp)
    if out_dir.exists():
        out_dir.rmdir()  # empty, checked above
    os.replace(tmp, out_dir)
    print(f"exported step {saved_step} of {run_dir} to {out_dir}")
    return out_dir


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tail-kd export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a training run's output directory")
    parser.add_argument("out_dir", help="the Hugging Face model folder to write")
    parser.add_argument(
        "--step", type=int, help="export this step's checkpoint (default: the newest complete one)"
    )
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32", help="weights dtype"
    )
    args = parser.parse_args(argv)
    try:
        export(args.run_dir, args.out_dir, step=args.step, dtype=getattr(torch, args.dtype))
    except (UsageError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
