"""Where the frozen teacher's weights live: `parallel.teacher_placement`.

    zero3        ZeRO-3 partitions, 1/N of the weights per rank (d_t P_t / N bytes); every
                 forward all-gathers every layer, and the loss the lm_head again: each rank
                 receives about d_t P_t per micro-batch (tail_kd/cost_model.py)
    replicated   the whole teacher on every GPU in its dtype (d_t P_t bytes each) and no engine:
                 nothing is gathered, ever. With vocab-parallel heads each rank reads its rows
                 straight from the resident lm_head
    auto         (the default) replicated when `tail-kd plan`'s memory estimate with the whole
                 teacher fits the smallest GPU of the job at the recipe's settings
                 (`memory_plan.choose_teacher_placement`), else zero3; zero3 on CPU ranks

The teacher gets no gradient and no optimizer either way, so the placement changes no number of
the run: the same curves, checkpoints and exported student (tests/test_train.py).
"""

from __future__ import annotations

import torch

from tail_kd.config import Recipe
from tail_kd.distributed import DistContext

__all__ = ["teacher_placement"]


def teacher_placement(recipe: Recipe, ctx: DistContext, teacher_config, student_config) -> str:
    """`replicated` or `zero3` for this job (module docstring); a collective with `auto` on GPUs
    (the ranks agree on the smallest GPU)."""
    chosen = recipe.parallel.teacher_placement
    if chosen != "auto" or recipe.teacher is None:
        return "zero3" if chosen == "auto" else chosen
    if ctx.device.type != "cuda":
        return "zero3"
    from tail_kd.memory_plan import (
        choose_teacher_placement,
        model_shape,
        setup_of,
        with_stored_states,
    )

    memory = torch.cuda.get_device_properties(ctx.device).total_memory
    budget = min(ctx.all_gather(memory))
    setup = setup_of(
        recipe,
        device="cuda",
        gpus=ctx.world_size,
        gpus_per_node=ctx.topology.local_world_size,
    )
    teacher = model_shape(teacher_config)
    setup = with_stored_states(setup, recipe, teacher, student_config)
    return choose_teacher_placement(model_shape(student_config), teacher, setup, budget)
