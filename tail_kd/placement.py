"""Where the models' weights live: `parallel.teacher_placement` and `parallel.student_zero_stage`.

The frozen teacher (N ranks, P_t parameters of d_t bytes):

    zero3        ZeRO-3 partitions, 1/N of the weights per rank (d_t P_t / N bytes); every
                 forward all-gathers every layer, and the loss the lm_head again: each rank
                 receives about d_t P_t per micro-batch (tail_kd/cost_model.py)
    replicated   the whole teacher on every GPU in its dtype (d_t P_t bytes each) and no engine:
                 nothing is gathered, ever. With vocab-parallel heads each rank reads its rows
                 straight from the resident lm_head

The student (P_s parameters), by ZeRO stage, what each rank holds and what a step sends:

    3   1/N of everything; its weights gathered at every micro-batch's forward, its gradients
        reduce-scattered after every micro-batch's backward
    2   the whole weights; gradients and optimizer states partitioned: gradients reduced after
        every micro-batch's backward, the updated weights all-gathered once per step
    1   the whole weights and gradients (accumulated locally); optimizer states partitioned:
        gradients all-reduced once per step, the updated weights all-gathered once per step

And `parallel.hpz_partition_size` G > 1 (ZeRO++'s hierarchical partitioning, hpZ): each ZeRO-3
engine also keeps its weights partitioned over groups of G consecutive ranks (d P / G bytes more
per rank) and, from its first gather on, gathers from that copy, within the node (G = the ranks
per node): the frozen teacher always, the student at every micro-batch but the first after each
optimizer step (which refreshes the copy); that gather and the gradients' reduce-scatter cross
nodes (tail_kd/cost_model.py).

`auto` (the default of all three) takes the placement `tail-kd plan` predicts fastest among those
whose memory estimate fits the smallest GPU of the job at the recipe's settings
(`memory_plan.choose_placement`; the ranks agree on the smallest GPU); hpZ only on jobs of several
nodes. On CPU ranks it keeps a ZeRO-3 teacher and a ZeRO-3 student, without hpZ.

Every placement computes the same thing: the same curves, checkpoints and exported student
(tests/test_train.py). Vocab-parallel heads read ZeRO-3's partitions: they need a ZeRO-3 student.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tail_kd.config import Recipe
from tail_kd.distributed import DistContext

__all__ = ["Placement", "choose_placement"]


@dataclass(frozen=True)
class Placement:
    """A job's placement (module docstring), as the run uses it."""

    teacher: str = "zero3"  # replicated | zero3
    student_zero_stage: int = 3  # 1 | 2 | 3
    hpz_partition_size: int = 1  # G: the ZeRO-3 engines' secondary partition; 1 = off

    def describe(self, recipe: Recipe) -> str:
        """`placement: teacher replicated, student ZeRO-1 (parallel.teacher_placement: auto, ...)`."""
        parallel = recipe.parallel
        hpz = f", hpZ over {self.hpz_partition_size} ranks" if self.hpz_partition_size > 1 else ""
        return (
            f"placement: teacher {self.teacher}, student ZeRO-{self.student_zero_stage}{hpz} "
            f"(parallel.teacher_placement: {parallel.teacher_placement}, "
            f"parallel.student_zero_stage: {parallel.student_zero_stage}, "
            f"parallel.hpz_partition_size: {parallel.hpz_partition_size})"
        )


def choose_placement(recipe: Recipe, ctx: DistContext, teacher_config, student_config) -> Placement:
    """This job's placement (module docstring): the recipe's settings, with `auto` resolved; a
    collective when there is a choice to make (on GPUs)."""
    from tail_kd.memory_plan import (
        NO_TEACHER,
        model_shape,
        placement_candidates,
        setup_of,
        with_stored_states,
    )
    from tail_kd.memory_plan import choose_placement as fastest_that_fits

    setup = setup_of(
        recipe,
        device=ctx.device.type,
        gpus=ctx.world_size,
        gpus_per_node=ctx.topology.local_world_size,
    )
    candidates = placement_candidates(setup, teacher=teacher_config is not None)
    if len(candidates) == 1:  # nothing to choose: no need to know the GPUs
        return Placement(*candidates[0])
    memory = torch.cuda.get_device_properties(ctx.device).total_memory
    budget = min(ctx.all_gather(memory))
    teacher = NO_TEACHER
    if teacher_config is not None:
        teacher = model_shape(teacher_config)
        setup = with_stored_states(setup, recipe, teacher, student_config)
    return Placement(*fastest_that_fits(model_shape(student_config), teacher, setup, budget))
