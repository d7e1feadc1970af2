"""`tail-kd cache-teacher RECIPE [--set KEY=VALUE ...] [--nproc N]`: write the teacher's hidden
states of a recipe's train and eval data once (tail_kd/teacher_cache.py), for the runs that set
`teacher.cached_states: true`.

    tail-kd cache-teacher recipes/tiny/tad.yaml --nproc 2          # N local ranks
    python -m tail_kd.cache_teacher recipes/tiny/tad.yaml          # one process
    srun python -m tail_kd.cache_teacher RECIPE                    # ranks from SLURM_* (torchrun too)

Give it the recipe and `--set` options of the runs (the key is made of the teacher, the data and
its sequence length, the teacher's dtype and the states the loss reads; the student, the loss
weights and the optimizer do not matter). The caches a job fills (models, tokenised data) are
filled first, before the process group. An entry already written is left as it is.

Work split: the teacher is placed as in training (`parallel.teacher_placement`: a ZeRO-3 inference
engine, its weights sharded over the ranks and every rank in every forward, or a whole copy per
GPU). Each split's N examples are cut into ceil(N / b) batches of
the recipe's micro-batch b; rank r computes batches r, r + W, r + 2W, ... and writes their rows
into the shared, preallocated files; a rank short of a batch in the last round repeats its last
one without writing it, so every rank runs the same number of forwards. Rank 0 holds the entry's
lock and commits (manifest, rename) once every rank has synced its rows.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from typing import Sequence

from tail_kd.config import RecipeError, add_override_argument, load_recipe
from tail_kd.exit_status import EXIT_USAGE, UsageError

__all__ = ["build_parser", "main", "run"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tail-kd cache-teacher",
        description="Write the teacher's hidden states of a recipe's data once, for the runs "
        "with teacher.cached_states: true.",
    )
    parser.add_argument("recipe", help="recipe YAML file")
    add_override_argument(parser, "data.seq_len=512")
    parser.add_argument(
        "--nproc", type=int, metavar="N", help="start N local ranks through the DeepSpeed launcher"
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.nproc is None:
        return run(args.recipe, args.overrides, args.local_rank)
    return _launch(args.recipe, args.overrides, args.nproc)


def run(recipe_path: str, overrides: Sequence[str] = (), local_rank: int | None = None) -> int:
    """Write the states of the recipe at `recipe_path` as this rank; return the exit status."""
    from tail_kd.topology import discover_topology

    rank = int(os.environ.get("RANK", 0))
    try:
        recipe = load_recipe(recipe_path, overrides)
        if recipe.teacher is None:
            raise RecipeError(f"{recipe_path}: no teacher section: there are no states to write")
        topology = discover_topology(local_rank=local_rank)
        rank = topology.rank
        recipe.check_world_size(topology.world_size)
        from tail_kd.distributed import init_distributed
        from tail_kd.prepare import prepare
        from tail_kd.teacher_cache import problem, spec_of

        prepare(recipe, check=False)  # models and data (the states' own item is what we write)
        spec = spec_of(recipe)
        why = problem(spec)
        if why is None:
            if rank == 0:
                print(f"teacher states already written: {spec.entry}")
            return 0
        if spec.entry.exists():
            raise UsageError(f"{why}; it is left as it is: delete {spec.entry} to write it again")
        ctx = init_distributed(recipe.device, topology)
    except (UsageError, FileNotFoundError) as error:
        if rank == 0:
            print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    _write(recipe, spec, ctx)
    return 0


def _write(recipe, spec, ctx) -> None:
    """Every rank: the teacher engine, this rank's batches, then rank 0 commits (module
    docstring)."""
    import torch
    from tqdm import tqdm

    from tail_kd.data.prepared import prepare_datasets
    from tail_kd.distiller import TeacherHiddenStates, teacher_engine
    from tail_kd.locks import exclusive_lock
    from tail_kd.models import load_causal_lm
    from tail_kd.pair import plan_models
    from tail_kd.placement import choose_placement
    from tail_kd.teacher_cache import StatesWriter

    plan = plan_models(recipe)
    prepared = prepare_datasets(recipe.data, plan.tokenizer, recipe.data.cache_dir, recipe.seed)
    splits = {"train": prepared.train, "eval": prepared.eval}
    teacher = load_causal_lm(plan.teacher_dir, spec.dtype)
    module = TeacherHiddenStates(teacher, tuple(spec.key["states"][1:]))
    placement = choose_placement(recipe, ctx, plan.teacher_config, plan.student_config)
    engine = teacher_engine(module, recipe, ctx, placement)
    batch_size, world = recipe.train.micro_batch_size, ctx.world_size
    with contextlib.ExitStack() as stack:
        folder = None
        if ctx.is_main:
            stack.enter_context(exclusive_lock(StatesWriter.lock_path(spec), str(spec.entry)))
            if not spec.entry.exists():  # else another job wrote it while we waited
                folder = StatesWriter.begin(spec).folder
        folder = ctx.broadcast(folder)
        if folder is None:
            if ctx.is_main:
                print(f"teacher states written meanwhile by another job: {spec.entry}")
            return
        writer = StatesWriter(spec, folder)
        for split, rows in spec.shapes.items():
            dataset, count = splits[split], rows[0]
            batches = math.ceil(count / batch_size)
            for round_ in tqdm(
                range(math.ceil(batches / world)), desc=split, disable=not ctx.is_main
            ):
                index = round_ * world + ctx.rank
                start = min(index, batches - 1) * batch_size
                items = [dataset[i] for i in range(start, min(start + batch_size, count))]
                input_ids = torch.stack([item["input_ids"] for item in items]).to(ctx.device)
                mask = torch.stack([item["attention_mask"] for item in items]).to(ctx.device)
                with torch.no_grad():
                    states = torch.stack(engine(input_ids, mask), dim=1)  # [B, S, T, H_t]
                if index < batches:
                    writer.write(split, start, states)
        writer.sync()
        ctx.barrier()
        if ctx.is_main:
            writer.commit()
            tokens = sum(shape[0] * shape[2] for shape in spec.shapes.values())
            print(
                f"teacher states: {spec.entry}: {tokens} tokens x {spec.bytes_per_token} bytes "
                f"per token = {tokens * spec.bytes_per_token / 2**20:.1f} MiB"
            )
    ctx.barrier()


def _launch(recipe_path: str, overrides: Sequence[str], nproc: int) -> int:
    """`run` on `nproc` local ranks through the DeepSpeed launcher (as `tail-kd train --nproc`)."""
    from tail_kd.cli import launch_ranks
    from tail_kd.distributed import resolve_device

    try:
        recipe = load_recipe(recipe_path, overrides)
        recipe.check_world_size(nproc)
        device = resolve_device(recipe.device)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    sets = [arg for override in overrides for arg in ("--set", override)]
    return launch_ranks("tail_kd.cache_teacher", [recipe_path, *sets], nproc, device).wait()


if __name__ == "__main__":
    sys.exit(main())
