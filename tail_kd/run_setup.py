"""Building a run: from a checked recipe and a joined process group to a `Trainer` ready to train.

Order of work, cheapest checks first, so that bad input is reported before any weight loads:
the DeepSpeed config (DeepSpeed's own schema) and the vocab-parallel rules; the output directory
(`--resume` of a finished run has nothing to do, `--overwrite` clears the old run); the models'
plan (`tail_kd.pair.plan_models`: the teacher resolved, the student's config derived, the
vocabularies checked); the data; then the weights, the two DeepSpeed engines, the checkpoint
manager and, with `--resume`, the newest complete checkpoint. With `teacher.cached_states` the
data carry the teacher's hidden states (tail_kd/teacher_cache.py; refused before any weight
loads when they were written for other inputs, and missing ones already by the entry point) and
the teacher is reduced to its lm_head once the student is made. The caches (a converted GGUF
teacher, the tokenised data) were filled by the entry point before the process group existed
(tail_kd/train.py), so here they are only read.
"""

from __future__ import annotations

from pathlib import Path

import datasets
from transformers.utils import logging as hf_logging

from tail_kd.checkpoint import CheckpointManager
from tail_kd.config import Recipe, RecipeError, vocab_parallel_problem
from tail_kd.data.loader import DistillationLoader
from tail_kd.data.prepared import prepare_datasets
from tail_kd.deepspeed_config import check_deepspeed_config, model_dtype
from tail_kd.distributed import DistContext
from tail_kd.export import save_student_spec
from tail_kd.monitor import Monitor
from tail_kd.pair import load_models, plan_models
from tail_kd.placement import choose_placement
from tail_kd.run_dir import DONE_MARKER, clear_output_dir, read_done
from tail_kd.signals import StopFlag
from tail_kd.teacher_cache import TeacherHead, cache_spec, with_teacher_states

__all__ = ["set_up_run"]


def set_up_run(recipe: Recipe, options, ctx: DistContext, stop_flag: StopFlag):
    """The `Trainer` of this rank (module docstring), or None when there is nothing to do (a
    finished run asked to `--resume`). `options`: the command line's `TrainOptions`."""
    from tail_kd.distiller import Distiller, loss_function
    from tail_kd.trainer import Trainer

    check_deepspeed_config(recipe, ctx.world_size, ctx.device.type)  # bad `deepspeed:` keys
    problem = vocab_parallel_problem(
        recipe.parallel.vocab_parallel_size,
        ranks_per_node=ctx.topology.local_world_size,
        reference_loss=options.reference_loss,
    )
    if problem:
        raise RecipeError(problem)
    if not ctx.is_main:  # one set of progress bars per job
        hf_logging.disable_progress_bar()
        datasets.disable_progress_bars()
    run_dir = Path(recipe.output_dir)
    tensorboard_run = Path(recipe.log.tensorboard_dir) / recipe.run_name
    done = read_done(run_dir)
    if options.resume and done is not None and done["step"] >= recipe.train.steps:
        if ctx.is_main:
            print(f"{run_dir} finished at step {done['step']}: nothing to resume")
        return None
    if ctx.is_main:
        if options.overwrite:
            clear_output_dir(run_dir, tensorboard_run)
        (run_dir / DONE_MARKER).unlink(missing_ok=True)  # resuming a run with more steps
        run_dir.mkdir(parents=True, exist_ok=True)
    ctx.barrier()

    plan = plan_models(recipe)
    if ctx.is_main:  # what `tail-kd export` needs besides the weights
        save_student_spec(
            run_dir, plan.student_config, plan.student_tokenizer, plan.generation_config
        )
    # From the cache the entry point filled before the process group existed (tail_kd/train.py).
    prepared = prepare_datasets(recipe.data, plan.tokenizer, recipe.data.cache_dir, recipe.seed)
    train_set, eval_set = prepared.train, prepared.eval
    teacher_dtype = model_dtype(recipe.teacher.dtype if recipe.teacher else "auto", ctx.device.type)
    cached = recipe.cached_teacher_states
    if cached:  # the teacher's states come with each example (tail_kd/teacher_cache.py)
        spec = cache_spec(recipe, plan, prepared, teacher_dtype)
        train_set, eval_set = with_teacher_states(spec, train_set, eval_set)
        if ctx.is_main:
            print(f"teacher: hidden states read from {spec.entry}, its lm_head alone kept")
    loader = DistillationLoader(
        train_set,
        recipe.train.micro_batch_size,
        ctx.rank,
        ctx.world_size,
        recipe.seed,
        pin_memory=ctx.device.type == "cuda",
    )
    teacher, student = load_models(recipe, plan, teacher_dtype)
    if cached:  # (a derived student was made from the whole teacher): keep its lm_head alone
        teacher = TeacherHead(teacher)
    loss_fn = loss_function(
        recipe.loss,
        plan,
        ctx.device.type,
        recipe.data,
        reference=options.reference_loss,
    )
    placement = choose_placement(recipe, ctx, plan.teacher_config, plan.student_config)
    if ctx.is_main:
        print(placement.describe(recipe))
    distiller = Distiller(
        teacher,
        student,
        recipe=recipe,
        ctx=ctx,
        loss_fn=loss_fn,
        vocab_size=plan.vocab_size,
        placement=placement,
    )
    checkpoints = CheckpointManager(run_dir, ctx, recipe.checkpoint.keep)
    trainer = Trainer(
        recipe=recipe,
        ctx=ctx,
        distiller=distiller,
        loader=loader,
        eval_set=eval_set,
        checkpoints=checkpoints,
        monitor=Monitor(
            ctx.is_main,
            tensorboard_run,
            recipe.train.steps,
            teacher=teacher is not None,
            hidden=recipe.loss.hidden_weight > 0,
        ),
        stop_flag=stop_flag,
        stop_after_steps=options.stop_after_steps,
    )
    latest = checkpoints.latest() if options.resume else None
    if latest is not None:
        trainer.resume(latest)
    return trainer
