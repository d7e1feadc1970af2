"""What a training step costs in time, before anything runs: FLOPs, bytes on the wire, seconds, and
the GPU-hours of a token budget. The time half of `tail-kd plan` (memory_plan.py is the memory
half); it models the placements tail-kd trains with (tail_kd/placement.py): a ZeRO-1, 2 or 3
student, and a ZeRO-3 or replicated teacher.

FLOPs (matmuls: what tensor cores do; the elementwise work of norms, activations and the loss
is left to the MFU). For a decoder of L layers, width H, query width H_q, MLP and projection
matmul weights N_lin (all layers), sequences of T tokens and V lm_head rows, per token:

    forward              F = 2 N_lin + 4 L T H_q
                         (scores and weighted values over all T positions, as attention kernels
                         compute them without causal block skipping; FlashAttention skips about
                         half of that second term)
    teacher              F_t                                  (inference only; 0 with
                                                              teacher.cached_states)
    student              3 F_s                                (backward = 2 x forward)
                         + F_s with activation checkpointing  (the layers' forward again)
    lm_heads             2 V H_t + 6 V H_s                    (teacher logits; student logits,
                         and in the same fused pass the gradients of its hidden states and of its
                         lm_head weight: tail_kd/losses/fused.py)

Communication, N ranks, b micro-batches accumulated per optimizer step, as DeepSpeed's
communication logger counts a collective (`deepspeed.comms_logger`: an all-gather by one rank's
shard, a reduce-scatter or all-reduce by its whole input). Per micro-batch, the ZeRO-3 teacher:

    all-gather       d_t G_t / N               G_t = P_t - persistent_t - [untied] V H_t (the
                                               teacher's forward: its lm_head is read once for
                     the whole run, gathered whole or as row shards, tail_kd/heads.py, and the
                     forward gathers it only as the input embedding it is when tied); with
                     teacher.cached_states (the engine holds its lm_head alone) or
                     parallel.teacher_placement replicated, G_t = 0

and the student, by `parallel.student_zero_stage`:

    ZeRO-3  per micro-batch  all-gather d G_s / N, G_s = P_s - persistent_s - [vocab-parallel,
                             untied] V H_s (once: DeepSpeed keeps the student's parameters from
                             the forward for the backward); reduce-scatter g P_s
            per step         all-reduce 16 bytes (overflow and gradient-norm checks)
    ZeRO-2  per micro-batch  all-reduce g P_s (DeepSpeed reduces stage-2 gradient buckets with
                             all-reduces, each rank keeping its partition)
            per step         all-gather d P_s / N (the updated weights), all-reduce 8 bytes
    ZeRO-1  per step         all-reduce g P_s (the gradients accumulated locally), all-gather
                             d P_s / N, all-reduce 8 bytes

persistent = tensors of at most `stage3_param_persistence_threshold` elements (kept whole on
every rank); d, d_t = bytes per element; g: bf16 unless `communication_data_type: fp32`.

With hpZ over groups of G ranks (`parallel.hpz_partition_size`) the ZeRO-3 engines gather from
their group's partition, shards of d G / G: the frozen teacher at every micro-batch, the student
at all but the first micro-batch after each optimizer step (DeepSpeed refreshes the group's
partition from that gather). Those gathers stay within the node; the rest cross it. (Measured on
4 CPU ranks in pairs, with 1 and with 2 micro-batches per step: tests/test_cost_model.py.)
(The first step, and the first after each evaluation, gather more: ZeRO-3 records its module
trace again there and fetches module by module.)

On the wire a ring all-gather brings (N - 1) shards into each GPU (and sends as many out), a ring
reduce-scatter (N - 1) / N of its input, a ring all-reduce twice that. Vocab-parallel heads (group of P) add exchanges that
tail-kd makes through torch.distributed, which DeepSpeed's logger does not see (an estimate of
what each rank receives: per step, the student's row shard, read again after each optimizer step,
and its row gradient, V (d + g) H_s / P (the teacher's rows are read once for the run); per
micro-batch, the group's hidden states, (P - 1) b T (d H_s + d_t H_t), the all-reduce of the
hidden-state gradient, 2 (P - 1) b T H_s 4 bytes, and the per-token numbers, P (K + 8) b T 4
bytes).

Time per optimizer step: compute = FLOPs per GPU / (peak x MFU), communication = bytes each GPU
receives / bandwidth per direction (within a node NVLink's; across nodes the network's share per
GPU, which bounds a ring through every GPU); the step is max(compute, communication) when
prefetching and bucketing hide the collectives behind compute, their sum when they do not. One
GPU communicates nothing. With cached teacher states the job also reads S H_t d_t bytes per token from disk: the
plan states the rate per node the step time implies.

Checked by tests/test_cost_model.py and tests/test_train.py: the FLOPs against torch's FLOP
counter on a real forward and backward (within 10%), the bytes against DeepSpeed's logger in real
2- and 4-rank runs of every placement and of hpZ (within 10%). Not checked: the vocab-parallel
exchanges' estimate, and the step time, which needs a GPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # memory_plan imports this module
    from tail_kd.memory_plan import ModelShape, Setup

__all__ = [
    "Hardware",
    "GPUS",
    "forward_flops_per_token",
    "micro_batch_flops",
    "step_bytes",
    "step_cost",
]

# Peak dense bf16 TFLOP/s of common GPUs (vendor figures, without sparsity).
GPUS = {"h100": 989.0, "h200": 989.0, "a100": 312.0, "l40s": 362.0, "a6000": 155.0, "l4": 121.0}


# Exchanges that never leave a node: hpZ's gathers, and the vocab-parallel groups (one node each).
WITHIN_NODE = ("hpz_all_gather_within_node", "vocab_parallel")


@dataclass(frozen=True)
class Hardware:
    """What the time model assumes about the machine (`tail-kd plan --gpu ... --mfu ...`)."""

    peak_tflops: float = GPUS["h100"]
    mfu: float = 0.4  # the fraction of peak the matmuls reach (40%: typical of well-fed ZeRO-3)
    intra_node_gbps: float = 300.0  # GB/s per GPU in a ring within a node (H100 NVLink)
    inter_node_gbps: float = 25.0  # GB/s per GPU across nodes (200 Gb/s InfiniBand per GPU)


def forward_flops_per_token(shape: ModelShape, seq_len: int) -> float:
    """F = 2 N_lin + 4 L T H_q (module docstring); 0 for no model."""
    return 2.0 * shape.linear_parameters + 4.0 * shape.layers * seq_len * shape.q_width


def micro_batch_flops(
    student: ModelShape, teacher: ModelShape, setup: Setup, micro_batch: int
) -> dict[str, float]:
    """Matmul FLOPs of one micro-batch on one GPU, by part, with `total`."""
    tokens = micro_batch * setup.seq_len
    f_s = forward_flops_per_token(student, setup.seq_len)
    rows = student.vocab_rows / setup.vocab_parallel_size  # each rank's share of the heads
    parts = {
        "teacher_forward": 0.0
        if setup.cached_states
        else tokens * forward_flops_per_token(teacher, setup.seq_len),
        "student_forward_backward": tokens * 3 * f_s,
        "recompute": tokens * f_s if setup.activation_checkpointing else 0.0,
        # The vocab group scores its P micro-batches together, each rank over its rows.
        "lm_heads": setup.vocab_parallel_size
        * tokens
        * rows
        * 2
        * (teacher.hidden + 3 * student.hidden),
    }
    parts["total"] = sum(parts.values())
    return parts


def step_bytes(
    student: ModelShape, teacher: ModelShape, setup: Setup, top_k: int = 10
) -> dict[str, dict[str, float]]:
    """Bytes of one optimizer step's collectives (module docstring): `logged` as DeepSpeed's
    logger counts them (by collective) and `wire`, what each GPU receives (and sends: a ring is
    symmetric) over its links (by collective, and `total`)."""
    n, d, d_t, g = setup.gpus, setup.student_bytes, setup.teacher_bytes, setup.gradient_bytes
    accumulation = setup.global_batch_size // (setup.micro_batch_size * n)
    vocab_parallel = setup.vocab_parallel_size > 1
    head_t, head_s = teacher.vocab_rows * teacher.hidden, student.vocab_rows * student.hidden
    if setup.teacher_placement == "replicated" or setup.cached_states:
        gathered_t = 0  # whole on every GPU, or a lm_head alone, read once for the run
    else:
        gathered_t = teacher.parameters - teacher.persistent_parameters(setup.persistence_threshold)
        gathered_t -= 0 if teacher.tied_lm_head else head_t
    p_s, stage = student.parameters, setup.student_zero_stage  # auto: 3 until chosen
    zero3_student = stage not in (1, 2)
    gathered_s = 0
    if zero3_student:
        gathered_s = p_s - student.persistent_parameters(setup.persistence_threshold)
        gathered_s -= head_s * (vocab_parallel and not student.tied_lm_head)
    # The ZeRO-3 engines' gathers: over all ranks (`primary`), or from the hpZ group's partition
    # (`local`, G ranks): the frozen teacher's always, the student's but for the first micro-batch
    # after each optimizer step (which refreshes that partition)
    hpz = 1 if setup.hpz_partition_size == "auto" else setup.hpz_partition_size
    primary, local = accumulation * (d_t * gathered_t + d * gathered_s), 0.0
    if hpz > 1:
        primary, local = d * gathered_s, primary - d * gathered_s
    logged, wire = {}, {}
    if n > 1:
        logged["all_gather_into_tensor"] = primary / n + (local / hpz if hpz > 1 else 0.0)
        wire["all_gather_into_tensor"] = (n - 1) * primary / n
        if hpz > 1:
            wire["hpz_all_gather_within_node"] = (hpz - 1) * local / hpz
        if zero3_student:
            logged["reduce_scatter_tensor"] = accumulation * g * p_s
            logged["all_reduce"] = 16.0
            wire["reduce_scatter_tensor"] = (n - 1) / n * logged["reduce_scatter_tensor"]
        else:  # ZeRO-1/2: the updated weights once; the gradients per step or micro-batch
            logged["all_gather_into_tensor"] += d * p_s / n
            logged["all_reduce"] = (accumulation if stage == 2 else 1) * g * p_s + 8.0
            wire["all_reduce"] = 2 * (n - 1) / n * logged["all_reduce"]
            wire["all_gather_into_tensor"] += (n - 1) * d * p_s / n
    if vocab_parallel:
        p, tokens = setup.vocab_parallel_size, setup.micro_batch_size * setup.seq_len
        wire["vocab_parallel"] = (d + g) * head_s / p + accumulation * (  # rows, their gradient
            (p - 1) * tokens * (d * student.hidden + d_t * teacher.hidden)
            + 2 * (p - 1) * tokens * student.hidden * 4
            + p * (top_k + 8) * tokens * 4
        )
    wire["total"] = sum(wire.values())
    return {"logged": logged, "wire": wire}


def step_cost(
    student: ModelShape,
    teacher: ModelShape,
    setup: Setup,
    hardware: Hardware,
    tokens: float | None = None,
    top_k: int = 10,
) -> dict[str, Any]:
    """One optimizer step on every GPU: FLOPs and bytes (per step and per token), compute and
    communication seconds, the step time with and without overlap, tokens per second, and for a
    budget of `tokens` the steps, GPU-hours and wall-clock days."""
    accumulation = setup.global_batch_size // (setup.micro_batch_size * setup.gpus)
    flops = micro_batch_flops(student, teacher, setup, setup.micro_batch_size)
    traffic = step_bytes(student, teacher, setup, top_k)
    step_flops = {name: accumulation * value for name, value in flops.items()}
    logged, wire = traffic["logged"], traffic["wire"]["total"]
    nodes = setup.gpus // setup.gpus_per_node
    within = sum(traffic["wire"].get(name, 0.0) for name in WITHIN_NODE)
    between = wire - within if nodes > 1 else 0.0
    compute = step_flops["total"] / (hardware.peak_tflops * 1e12 * hardware.mfu)
    communication = (wire - between) / (hardware.intra_node_gbps * 1e9) + between / (
        hardware.inter_node_gbps * 1e9
    )
    step_tokens = setup.global_batch_size * setup.seq_len
    overlapped = max(compute, communication)
    cost = {
        "hardware": asdict(hardware),
        "accumulation": accumulation,
        "flops_per_token": {
            name: value / (setup.micro_batch_size * setup.seq_len) for name, value in flops.items()
        },
        "flops_per_step_per_gpu": step_flops,
        "logged_bytes_per_step": logged,
        "received_bytes_per_step_per_gpu": wire,
        "received_between_nodes_bytes_per_step_per_gpu": between,
        "compute_seconds": compute,
        "communication_seconds": communication,
        "step_seconds": overlapped,
        "step_seconds_without_overlap": compute + communication,
        "tokens_per_second": step_tokens / overlapped,
    }
    if setup.cached_states:  # what the job reads of the stored teacher states, per node
        per_token = setup.stored_states * teacher.hidden * setup.teacher_bytes
        cost["states_read_gbps_per_node"] = cost["tokens_per_second"] * per_token / nodes / 1e9
    if tokens:
        steps = tokens / step_tokens
        cost["budget"] = {
            "tokens": tokens,
            "steps": steps,
            "gpu_hours": steps * overlapped * setup.gpus / 3600,
            "days": steps * overlapped / 86400,
        }
    return cost
