"""`tail-kd plan`: a recipe's memory per GPU before anything runs, and the largest micro-batch that fits.
(It also prints what a step costs in time and a token budget in GPU-hours: tail_kd/cost_model.py.)

For N GPUs (G per node, N / G nodes), micro-batch b, sequence length T, student / teacher
parameters P_s / P_t, lm_head rows V, widths H_s / H_t, and bytes per element d (the student's
training dtype: 2 for bf16, 4 for float32) and d_t (the teacher's dtype), the estimate per GPU is
the sum of:

    student model states   by `parallel.student_zero_stage` (tail_kd/placement.py):
                           ZeRO-3: DeepSpeed's own estimate
                           (`deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs`):
                           18 P_s / N bytes (bf16 weights, fp32 gradients, master weights and Adam
                           moments) + 4 bytes per parameter of the largest layer; with
                           offload_optimizer only the 2 P_s / N of bf16 weights stay, with
                           offload_param as well, only the largest layer.
                           ZeRO-2: DeepSpeed's (`stage_1_and_2.estimate_zero2_model_states_mem_
                           needs`): 2 P_s + 18 P_s / N, 2 P_s with offload_optimizer.
                           ZeRO-1: (d + 4) P_s + 12 P_s / N: whole weights and whole float32
                           gradients accumulated over micro-batches, partitioned master weights and
                           moments (on the host with offload_optimizer).
    teacher parameters     d_t P_t / N (0 with offload_param) + d_t x its largest layer (gathered);
                           replicated (parallel.teacher_placement): d_t P_t, nothing gathered
    lm_heads               both whole while the loss runs: the student's gathered (a ZeRO-1/2
                           student's is resident: counted with its parameters), the teacher's
                           gathered once and kept for the run (a replicated teacher's is counted
                           with its parameters), and the student's lm_head
                           gradient that the fused loss forms in the forward, summed in float32
                           and returned in the training dtype (both alive for a moment):
                           V ((d + g) H_s + d_t H_t), g = 4 + d if d < 4 else 4 (less what is
                           resident),
                           with V / P rows for parallel.vocab_parallel_size P
    loss chunk             c V e (V / P rows): c = min(chunk, b T) tokens (chunk: loss.chunk_size,
                           auto: max(1024, T)) of logits and their
                           gradient, e bytes per logit as measured by tools/bench_loss.py
                           (BENCHMARKS.md): 3 d + 1 with compiled kernels, 48 eager
    student activations    what autograd saves per token and decoder layer in a Hugging Face
                           Llama/Qwen2/Mistral layer with SDPA attention (measured with saved-tensor
                           hooks, tests/test_memory_plan.py):
                               A = d (8 H + 2 H_kv + 4 I) + 4 n_heads  [+ 4 H when d = 2:
                                   RMSNorm's float32 copies of its bf16 inputs]
                           (H_kv = key/value width, I = MLP width). Without activation
                           checkpointing L b T A; with it L b T d H (each layer's input) + b T A
                           (the layer being recomputed). Plus the final hidden states, their norm
                           and their gradient: b T H (2 d + 4)
    teacher activations    no autograd: at most one layer's tensors at a time, b T A_t, and the
                           final hidden states the loss reads, b T H_t d_t
    with teacher.cached_states (tail_kd/teacher_cache.py) no teacher backbone runs: its
    parameters are its lm_head's partition, d_t V H_t / N (the gathered copy is under lm_heads),
    and its activations the S states read with the batch, b T S H_t d_t (S = 1, + the aligned
    layers with loss.hidden_weight > 0)
    overhead               on a GPU, the CUDA context and the allocator's slack: 1 GiB + 10%

Host memory per node: `tail-kd train` loads both models on every rank before DeepSpeed
partitions them (no zero.Init), G (d_t P_t + 4 P_s), and holds what is offloaded: DeepSpeed's CPU
estimate for the student (its 1.5 safety factor included) and the teacher's d_t P_t / (N / G).

Disk for the cached teacher states (`tail-kd cache-teacher`, whether the recipe uses them or not):
S H_t d_t bytes per token of the train and eval data (4 KiB for Qwen1.5-1.8B in bf16).

The estimate is for planning: it is checked against measured peaks (tools/bench_train.py
--memory; BENCHMARKS.md) and errs on the large side.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from tail_kd.config import (
    Recipe,
    RecipeError,
    add_override_argument,
    load_recipe,
    vocab_parallel_problem,
)
from tail_kd.cost_model import GPUS, Hardware, step_cost
from tail_kd.deepspeed_config import model_dtype, offloaded, student_config
from tail_kd.exit_status import EXIT_USAGE, UsageError
from tail_kd.teacher_cache import state_indices

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = [
    "ModelShape",
    "Setup",
    "model_shape",
    "setup_of",
    "activation_bytes_per_token_layer",
    "estimate",
    "largest_micro_batch",
    "splitting_micro_batch",
    "plan_configs",
    "option_overrides",
    "main",
]

GIB = 2**30
CUDA_OVERHEAD = 1 * GIB  # context, cuBLAS workspace, NCCL buffers
ALLOCATOR_SLACK = 0.10  # fragmentation of PyTorch's caching allocator
MAX_MICRO_BATCH = 4096


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a model, read from its config (no weights)."""

    parameters: int  # unique parameters (tied embeddings counted once)
    largest_layer: int  # parameters of the largest module (usually the embedding)
    layers: int
    hidden: int
    kv_width: int  # key/value projection width: key_value_heads x head_dim
    intermediate: int
    heads: int
    vocab_rows: int  # lm_head rows, padding rows included
    # For the time model (tail_kd/cost_model.py):
    q_width: int = 0  # query projection width: heads x head_dim
    linear_parameters: int = 0  # the decoder layers' matmul weights (all layers)
    tied_lm_head: bool = False  # the lm_head is the input embedding
    tensor_sizes: tuple[tuple[int, int], ...] = ()  # (elements, how many tensors of that size)

    def persistent_parameters(self, threshold: int) -> int:
        """Parameters in tensors of at most `threshold` elements: DeepSpeed's ZeRO-3 keeps those
        whole on every rank (`stage3_param_persistence_threshold`) and never gathers them."""
        return sum(size * count for size, count in self.tensor_sizes if size <= threshold)


# A recipe without a teacher (CE only) plans with this one: it costs nothing.
NO_TEACHER = ModelShape(0, 0, 0, 0, 0, 0, 0, 0)


def model_shape(config) -> ModelShape:
    """Count a Hugging Face config's parameters on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    layers = model.get_decoder().layers
    sizes = Counter(p.numel() for p in model.parameters())
    return ModelShape(
        parameters=sum(p.numel() for p in model.parameters()),
        largest_layer=max(
            sum(p.numel() for p in module.parameters(recurse=False)) for module in model.modules()
        ),
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        kv_width=kv_heads * head_dim,
        intermediate=config.intermediate_size,
        heads=heads,
        vocab_rows=model.get_output_embeddings().weight.shape[0],
        q_width=heads * head_dim,
        linear_parameters=sum(
            m.weight.numel() for m in layers.modules() if isinstance(m, torch.nn.Linear)
        ),
        tied_lm_head=model.get_output_embeddings().weight is model.get_input_embeddings().weight,
        tensor_sizes=tuple(sorted(sizes.items())),
    )


@dataclass(frozen=True)
class Setup:
    """The recipe's settings that decide memory, for `gpus` ranks on `device`."""

    device: str  # cuda or cpu
    gpus: int
    gpus_per_node: int
    seq_len: int
    micro_batch_size: int  # the recipe's, or the largest below it that splits the global batch
    recipe_micro_batch_size: int
    global_batch_size: int
    student_bytes: int  # d: bytes per element of the student's training dtype
    teacher_bytes: int  # d_t
    offload_param: bool
    offload_optimizer: bool
    activation_checkpointing: bool
    loss_chunk: int
    compiled_loss: bool
    vocab_parallel_size: int  # P: each rank holds 1/P of the lm_head rows for the loss
    # For the time model (tail_kd/cost_model.py):
    persistence_threshold: int = 100_000  # ZeRO-3 keeps tensors of at most this many elements whole
    gradient_bytes: int = 4  # bytes per gradient element reduce-scattered
    # parallel.teacher_placement and parallel.student_zero_stage; `auto` until make_plan chooses,
    # estimated meanwhile as ZeRO-3 (as the DeepSpeed config is built: deepspeed_config.py)
    teacher_placement: str = "zero3"
    student_zero_stage: int | str = 3
    hpz_partition_size: int | str = 1  # parallel.hpz_partition_size (auto: off until chosen)
    cached_states: bool = False  # teacher.cached_states: no teacher backbone runs
    stored_states: int = 1  # S: the teacher's hidden states per token the loss reads (main sets it)


def setup_of(recipe: Recipe, *, device: str, gpus: int, gpus_per_node: int) -> Setup:
    """The memory-relevant settings of `recipe`, with DeepSpeed's config as the trainer builds it.

    A micro-batch that does not split `train.global_batch_size` over `gpus` is replaced by the
    largest one below it that does (the plan says so); a global batch that no micro-batch splits
    is an error.
    """
    train = recipe.train
    micro_batch = splitting_micro_batch(train.micro_batch_size, train.global_batch_size, gpus)
    if micro_batch == 0:
        raise RecipeError(
            f"train.global_batch_size: {train.global_batch_size} sequences do not split evenly "
            f"over {gpus} GPUs: make it a multiple of {gpus}"
        )
    recipe = dataclasses.replace(
        recipe, train=dataclasses.replace(train, micro_batch_size=micro_batch)
    )
    recipe.check_world_size(gpus)
    ds_config = student_config(recipe, gpus, device)
    offload = offloaded(ds_config)
    kernels = recipe.loss.kernels
    student_bytes = model_dtype(recipe.train.precision, device).itemsize
    zero = ds_config["zero_optimization"]
    return Setup(
        device=device,
        gpus=gpus,
        gpus_per_node=gpus_per_node,
        seq_len=recipe.data.seq_len,
        micro_batch_size=micro_batch,
        recipe_micro_batch_size=train.micro_batch_size,
        global_batch_size=recipe.train.global_batch_size,
        student_bytes=student_bytes,
        teacher_bytes=model_dtype(
            recipe.teacher.dtype if recipe.teacher else "auto", device
        ).itemsize,
        offload_param="offload_param" in offload,
        offload_optimizer="offload_optimizer" in offload,
        activation_checkpointing=recipe.train.activation_checkpointing,
        loss_chunk=recipe.loss.chunk_tokens(recipe.data.seq_len),
        compiled_loss=kernels == "compiled" or (kernels == "auto" and device == "cuda"),
        vocab_parallel_size=recipe.parallel.vocab_parallel_size,
        persistence_threshold=int(zero.get("stage3_param_persistence_threshold", 100_000)),
        gradient_bytes=4 if ds_config.get("communication_data_type") == "fp32" else student_bytes,
        teacher_placement=recipe.parallel.teacher_placement,
        student_zero_stage=recipe.parallel.student_zero_stage,
        hpz_partition_size=recipe.parallel.hpz_partition_size,
        cached_states=recipe.cached_teacher_states,
    )


def activation_bytes_per_token_layer(shape: ModelShape, dtype_bytes: int) -> int:
    """A = d (8 H + 2 H_kv + 4 I) + 4 n_heads [+ 4 H when d = 2] (module docstring)."""
    a = dtype_bytes * (8 * shape.hidden + 2 * shape.kv_width + 4 * shape.intermediate)
    a += 4 * shape.heads  # SDPA's float32 log-sum-exp per head
    if dtype_bytes < 4:
        a += 4 * shape.hidden
    return a


def estimate(
    student: ModelShape, teacher: ModelShape, setup: Setup, micro_batch: int
) -> dict[str, int]:
    """Bytes per GPU by component (module docstring) at `micro_batch`, with `total`."""

    d, d_t, n = setup.student_bytes, setup.teacher_bytes, setup.gpus
    tokens = micro_batch * setup.seq_len
    teacher_params = 0 if setup.offload_param else d_t * teacher.parameters // n
    teacher_params += d_t * teacher.largest_layer
    teacher_acts = tokens * (activation_bytes_per_token_layer(teacher, d_t) + d_t * teacher.hidden)
    if setup.cached_states:  # the lm_head alone, and the states that come with the batch
        head = d_t * teacher.vocab_rows * teacher.hidden
        teacher_params = 0 if setup.offload_param else head // n
        teacher_acts = tokens * teacher_cache_bytes_per_token(teacher, setup)
    student_states = student_model_states(student, setup)
    replicated = setup.teacher_placement == "replicated"
    if replicated:  # the whole teacher (its lm_head alone with cached states) on every GPU
        head = teacher.vocab_rows * teacher.hidden
        teacher_params = d_t * (head if setup.cached_states else teacher.parameters)
    hpz = hpz_size(setup)
    if hpz > 1:  # the ZeRO-3 engines' secondary partitions
        if not replicated and not setup.cached_states:
            teacher_params += d_t * teacher.parameters // hpz
        if setup.student_zero_stage not in (1, 2):
            student_states += d * student.parameters // hpz
    a_student = activation_bytes_per_token_layer(student, d)
    if setup.activation_checkpointing:
        student_acts = student.layers * tokens * d * student.hidden + tokens * a_student
    else:
        student_acts = student.layers * tokens * a_student
    student_acts += tokens * student.hidden * (2 * d + 4)
    per_logit = 3 * d + 1 if setup.compiled_loss else 48
    rows = -(-student.vocab_rows // setup.vocab_parallel_size)
    gathered_s = 0 if setup.student_zero_stage in (1, 2) else d  # ZeRO-1/2: it is resident
    parts = {
        "student_model_states": student_states,
        "teacher_parameters": teacher_params,
        "lm_heads": rows
        * (
            (gathered_s + _gradient_bytes(d)) * student.hidden
            + (0 if replicated else d_t * teacher.hidden)
        ),
        "loss_chunk": min(setup.loss_chunk, tokens) * rows * per_logit,
        "student_activations": student_acts,
        "teacher_activations": teacher_acts,
    }
    subtotal = sum(parts.values())
    parts["overhead"] = (
        CUDA_OVERHEAD + int(ALLOCATOR_SLACK * subtotal) if setup.device == "cuda" else 0
    )
    parts["total"] = subtotal + parts["overhead"]
    return parts


def student_model_states(student: ModelShape, setup: Setup) -> int:
    """The student's weights, gradients and optimizer states on one GPU, by ZeRO stage (module
    docstring)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    p, nodes = student.parameters, max(1, setup.gpus // setup.gpus_per_node)
    if setup.student_zero_stage == 1:
        return (setup.student_bytes + 4) * p + (
            0 if setup.offload_optimizer else 12 * p // setup.gpus
        )
    if setup.student_zero_stage == 2:
        return estimate_zero2_model_states_mem_needs(
            p, setup.gpus_per_node, nodes, cpu_offload=setup.offload_optimizer
        )[1]
    return estimate_zero3_model_states_mem_needs(
        p,
        student.largest_layer,
        num_gpus_per_node=setup.gpus_per_node,
        num_nodes=nodes,
        cpu_offload=setup.offload_optimizer,
        cpu_offload_params=setup.offload_param and setup.offload_optimizer,
        zero_init=False,
    )[1]


def teacher_cache_bytes_per_token(teacher: ModelShape, setup: Setup) -> int:
    """Disk (and batch memory) of the cached teacher states: S H_t d_t bytes per token."""
    return setup.stored_states * teacher.hidden * setup.teacher_bytes


def _gradient_bytes(d: int) -> int:
    """Bytes per element of the fused loss's lm_head gradient at its peak: the float32 sum, and
    its copy in the training dtype when that is narrower."""
    return 4 + d if d < 4 else 4


def host_bytes_per_node(student: ModelShape, teacher: ModelShape, setup: Setup) -> int:
    """Host memory per node: loading, then what is offloaded (module docstring)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    nodes = max(1, setup.gpus // setup.gpus_per_node)
    loading = setup.gpus_per_node * (
        setup.teacher_bytes * teacher.parameters + 4 * student.parameters
    )
    offloaded_bytes = 0
    if setup.offload_optimizer and setup.student_zero_stage in (1, 2):
        offloaded_bytes, _ = estimate_zero2_model_states_mem_needs(
            student.parameters, setup.gpus_per_node, nodes, cpu_offload=True
        )
    elif setup.offload_optimizer:
        offloaded_bytes, _, _ = estimate_zero3_model_states_mem_needs(
            student.parameters,
            student.largest_layer,
            num_gpus_per_node=setup.gpus_per_node,
            num_nodes=nodes,
            cpu_offload=True,
            cpu_offload_params=setup.offload_param,
            zero_init=True,  # what stays after loading: the partitions, not the full copies
        )
    if setup.offload_param and setup.teacher_placement != "replicated":
        offloaded_bytes += setup.teacher_bytes * teacher.parameters // nodes
    return max(loading, offloaded_bytes)


def largest_micro_batch(student: ModelShape, teacher: ModelShape, setup: Setup, budget: int) -> int:
    """The largest micro-batch whose estimate fits in `budget` bytes (0: not even one)."""
    best = 0
    for micro_batch in range(1, MAX_MICRO_BATCH + 1):
        if estimate(student, teacher, setup, micro_batch)["total"] > budget:
            break
        best = micro_batch
    return best


def splitting_micro_batch(limit: int, global_batch_size: int, gpus: int) -> int:
    """The largest micro-batch <= `limit` that splits `global_batch_size` over `gpus` evenly
    (gradient accumulation makes up the rest), or 0 if none does."""
    for micro_batch in range(limit, 0, -1):
        if global_batch_size % (micro_batch * gpus) == 0:
            return micro_batch
    return 0


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tail-kd plan",
        description="Estimate a recipe's memory per GPU (reads the models' configs, loads no "
        "weights) and propose the largest micro-batch that fits.",
    )
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs in the job (default 1)")
    parser.add_argument(
        "--gpus-per-node", type=int, help="GPUs per node (default: all --gpus on one node)"
    )
    parser.add_argument(
        "--gpu-memory",
        type=float,
        metavar="GB",
        help="memory per GPU in GiB (default: this machine's GPU, else 80)",
    )
    parser.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="plan for GPUs (default) or for CPU ranks (float32, eager loss, no CUDA overhead)",
    )
    parser.add_argument(
        "--teacher-config",
        metavar="PATH",
        help="the teacher's config.json (or its folder), instead of the recipe's teacher",
    )
    parser.add_argument(
        "--student-config",
        metavar="PATH",
        help="the student's config.json (or its folder), for student.init config or pretrained",
    )
    time = parser.add_argument_group("time (tail_kd/cost_model.py)")
    time.add_argument(
        "--gpu",
        default="h100",
        metavar="NAME_OR_TFLOPS",
        help=f"GPU model ({', '.join(GPUS)}) or its peak bf16 TFLOP/s (default h100)",
    )
    time.add_argument(
        "--mfu", type=float, default=Hardware.mfu, help="assumed fraction of peak (default 0.4)"
    )
    for flag, default, where in (
        ("--intra-node-bw", Hardware.intra_node_gbps, "within a node (default %g: NVLink)"),
        ("--inter-node-bw", Hardware.inter_node_gbps, "between nodes (default %g: 200 Gb/s IB)"),
    ):
        time.add_argument(
            flag,
            type=float,
            default=default,
            metavar="GBPS",
            help="GB/s per GPU " + where % default,
        )
    time.add_argument(
        "--tokens",
        type=float,
        metavar="T",
        help="training tokens to cost (default: the recipe's steps x global batch x seq_len)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the plan as JSON")
    add_override_argument(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    gpus_per_node = args.gpus_per_node or args.gpus
    if args.gpus < 1 or args.gpus % gpus_per_node:
        print(
            f"error: --gpus {args.gpus} is not a multiple of --gpus-per-node {gpus_per_node}",
            file=sys.stderr,
        )
        return 2
    memory_gib = args.gpu_memory or _local_gpu_memory_gib() or 80.0
    try:
        hardware = _hardware(args)
        recipe = load_recipe(args.recipe, args.overrides)
        setup = setup_of(recipe, device=args.device, gpus=args.gpus, gpus_per_node=gpus_per_node)
        teacher_config, student_config = plan_configs(
            recipe, args.teacher_config, args.student_config
        )
    except (UsageError, FileNotFoundError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    teacher = NO_TEACHER if teacher_config is None else model_shape(teacher_config)
    if teacher_config is not None:
        setup = with_stored_states(setup, recipe, teacher, student_config)
    student = model_shape(student_config)
    plan = make_plan(student, teacher, setup, memory_gib * GIB)
    setup = Setup(**plan["setup"])  # with the placement chosen
    tokens = args.tokens or recipe.train.steps * setup.global_batch_size * setup.seq_len
    plan["time"] = step_cost(student, teacher, setup, hardware, tokens, recipe.loss.k)
    print(format_plan(args.recipe, plan))
    print(format_time(plan["time"], setup, args.gpu))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(plan, file, indent=2)
    return 0 if plan["fits"] else 1


def plan_configs(
    recipe: Recipe, teacher_config: str | None = None, student_config: str | None = None
) -> tuple[PretrainedConfig | None, PretrainedConfig]:
    """The teacher's (None without a teacher) and the student's configs, read without weights
    and, for the shipped recipes, without the hub: the `--teacher-config`/`--student-config`
    given, else the config tail-kd ships for a recipe's hub model (tail_kd/models/shipped.py),
    else the model's own (a local folder or GGUF file; a hub model's config is downloaded)."""
    from transformers import AutoConfig

    from tail_kd.models.shipped import shipped_config_dir
    from tail_kd.pair import resolve_teacher, student_config_of

    teacher = None
    if recipe.teacher is not None:
        teacher_source = (
            teacher_config or shipped_config_dir(recipe.teacher.path) or resolve_teacher(recipe)
        )
        teacher = AutoConfig.from_pretrained(teacher_source)
    student_source = student_config or shipped_config_dir(recipe.student.path)
    return teacher, student_config_of(recipe, teacher, student_source)


# From fastest to most frugal: (offload_optimizer, offload_param, activation_checkpointing).
# Recomputing activations costs about a third of the student's forward and backward; offloading
# moves the optimizer step (and, with parameters, every layer's weights) over PCIe, which costs more.
OPTIONS = (
    (False, False, False),
    (False, False, True),
    (True, False, False),
    (True, False, True),
    (True, True, False),
    (True, True, True),
)


def with_stored_states(setup: Setup, recipe: Recipe, teacher: ModelShape, student_config) -> Setup:
    """`setup` with S, the teacher hidden states per token the loss reads
    (tail_kd/teacher_cache.py)."""
    indices = state_indices(recipe.loss, teacher.layers, student_config.num_hidden_layers)
    return dataclasses.replace(setup, stored_states=len(indices))


def hpz_size(setup: Setup) -> int:
    """The hpZ group size in effect: 1 (off) while `auto` is unresolved."""
    return 1 if setup.hpz_partition_size == "auto" else setup.hpz_partition_size


def placement_candidates(setup: Setup, teacher: bool = True) -> list[tuple[str, int, int]]:
    """The (teacher placement, student ZeRO stage, hpZ group size) placements `auto` may choose
    from, in the order ties are broken (fewest gathers, then least memory first): the recipe's
    settings where they are not `auto`; a ZeRO-3 student with vocab-parallel heads or offloaded
    parameters; both ZeRO-3 and no hpZ on CPU ranks (they share one host's memory, and ZeRO-3
    keeps CPU runs as they were); hpZ over a node only on jobs of several nodes, and only where an
    engine is ZeRO-3. Without a teacher its placement means nothing: zero3."""
    cpu = setup.device != "cuda"
    teachers = [setup.teacher_placement]
    if not teacher or (cpu and setup.teacher_placement == "auto"):
        teachers = ["zero3"]
    elif setup.teacher_placement == "auto":
        teachers = ["replicated", "zero3"]
    stages = [setup.student_zero_stage]
    if setup.student_zero_stage == "auto":
        only_zero3 = cpu or setup.vocab_parallel_size > 1 or setup.offload_param
        stages = [3] if only_zero3 else [1, 2, 3]
    groups = [setup.hpz_partition_size]
    if setup.hpz_partition_size == "auto":
        several_nodes = setup.gpus > setup.gpus_per_node > 1
        groups = [1, setup.gpus_per_node] if several_nodes and not cpu else [1]
    candidates = []
    for placement in teachers:
        for stage in stages:
            zero3 = (teacher and placement == "zero3" and not setup.cached_states) or stage == 3
            for group in groups if zero3 else [1]:
                candidates.append((placement, stage, group))
    return candidates


def choose_placement(
    student: ModelShape, teacher: ModelShape, setup: Setup, budget: int
) -> tuple[str, int, int]:
    """`auto` placements (tail_kd/placement.py): of `placement_candidates`, the one whose step the
    time model (tail_kd/cost_model.py, default hardware, communication not overlapped) predicts
    fastest among those whose estimate fits `budget` at the recipe's micro-batch; the one with
    the smallest estimate when none fits."""
    candidates = placement_candidates(setup, teacher=teacher.parameters > 0)
    variants = {c: with_placement(setup, c) for c in candidates}
    total = {
        c: estimate(student, teacher, v, setup.micro_batch_size)["total"]
        for c, v in variants.items()
    }
    fitting = [c for c in candidates if total[c] <= budget]
    if not fitting:
        return min(candidates, key=total.__getitem__)
    seconds = {
        c: step_cost(student, teacher, variants[c], Hardware())["step_seconds_without_overlap"]
        for c in fitting
    }
    return min(fitting, key=seconds.__getitem__)  # the first of equals: the tie-break order


def with_placement(setup: Setup, placement: tuple[str, int, int]) -> Setup:
    """`setup` with a (teacher placement, student ZeRO stage, hpZ group size)."""
    teacher, stage, hpz = placement
    return dataclasses.replace(
        setup, teacher_placement=teacher, student_zero_stage=stage, hpz_partition_size=hpz
    )


def make_plan(
    student: ModelShape, teacher: ModelShape, setup: Setup, budget: float
) -> dict[str, object]:
    """The estimate at the recipe's settings, the largest micro-batch of every offload and
    checkpointing option, the fastest option that fits the recipe's micro-batch, host memory;
    `auto` placements chosen (`choose_placement`)."""
    budget = int(budget)
    setup = with_placement(setup, choose_placement(student, teacher, setup, budget))
    options = []
    for offload_optimizer, offload_param, checkpointing in OPTIONS:
        offload = [
            key
            for key, on in (
                ("offload_param", offload_param),
                ("offload_optimizer", offload_optimizer),
            )
            if on
        ]
        if vocab_parallel_problem(setup.vocab_parallel_size, offloaded=offload):
            continue
        variant = Setup(
            **{
                **asdict(setup),
                "offload_optimizer": offload_optimizer,
                "offload_param": offload_param,
                "activation_checkpointing": checkpointing,
                # parameters are offloaded by ZeRO-3 only
                "student_zero_stage": 3 if offload_param else setup.student_zero_stage,
            }
        )
        limit = largest_micro_batch(student, teacher, variant, budget)
        options.append(
            {
                "offload_optimizer": offload_optimizer,
                "offload_param": offload_param,
                "activation_checkpointing": checkpointing,
                "student_zero_stage": variant.student_zero_stage,
                "largest_micro_batch": limit,
                "largest_valid_micro_batch": splitting_micro_batch(
                    limit, variant.global_batch_size, variant.gpus
                ),
                "host_bytes_per_node": host_bytes_per_node(student, teacher, variant),
            }
        )
    parts = estimate(student, teacher, setup, setup.micro_batch_size)
    recommended = next(
        (o for o in options if o["largest_micro_batch"] >= setup.micro_batch_size), None
    )
    return {
        "setup": asdict(setup),
        "budget_bytes": budget,
        "student": asdict(student),
        "teacher": asdict(teacher),
        "bytes": parts,
        "fits": parts["total"] <= budget,
        "options": options,
        "recommended": recommended,
        "host_bytes_per_node": host_bytes_per_node(student, teacher, setup),
        "teacher_cache_bytes_per_token": teacher_cache_bytes_per_token(teacher, setup),
    }


def option_overrides(option: dict, micro_batch_size: int | None = None) -> list[str]:
    """The `--set` values that select an option of `make_plan` (and `micro_batch_size`, if given).

    With the optimizer offloaded, `torch_adam=false` has DeepSpeed step it with its own CPU Adam
    (compiled on first use, which needs g++) instead of torch's AdamW, several times faster on
    the CPU. This is the one place tail-kd gives that advice: recipes and READMEs point here.
    """
    zero = "deepspeed.zero_optimization"
    overrides = [
        f"{zero}.offload_optimizer.device={'cpu' if option['offload_optimizer'] else 'none'}",
        f"{zero}.offload_param.device={'cpu' if option['offload_param'] else 'none'}",
        f"train.activation_checkpointing={str(option['activation_checkpointing']).lower()}",
    ]
    if option["offload_optimizer"]:
        overrides.append("deepspeed.optimizer.params.torch_adam=false")
    if "student_zero_stage" in option:
        overrides.append(f"parallel.student_zero_stage={option['student_zero_stage']}")
    if micro_batch_size is not None:
        overrides.append(f"train.micro_batch_size={micro_batch_size}")
    return overrides


def _option_name(option: dict) -> tuple[str, str]:
    offload = [name for name in ("optimizer", "param") if option[f"offload_{name}"]]
    return "+".join(offload) or "none", "on" if option["activation_checkpointing"] else "off"


def format_plan(recipe_path: str, plan: dict) -> str:
    setup, parts = plan["setup"], plan["bytes"]
    student, teacher = plan["student"], plan["teacher"]

    def gib(value: float) -> str:
        return f"{value / GIB:.2f} GiB"

    offload, checkpointing = _option_name(setup)
    lines = [
        f"{recipe_path}: {setup['gpus']} x {gib(plan['budget_bytes'])} ({setup['device']}), "
        f"{8 * setup['student_bytes']}-bit student, {8 * setup['teacher_bytes']}-bit teacher",
        f"teacher {teacher['parameters'] / 1e9:.3f}B parameters ({teacher['layers']} layers, "
        f"hidden {teacher['hidden']}); student {student['parameters'] / 1e9:.3f}B "
        f"({student['layers']} layers, hidden {student['hidden']}); "
        f"{student['vocab_rows']} lm_head rows",
        "",
        *(
            [
                f"micro-batch: the recipe's {setup['recipe_micro_batch_size']} does not split "
                f"global_batch_size {setup['global_batch_size']} over {setup['gpus']} GPUs; "
                f"planned with {setup['micro_batch_size']} (--set "
                f"train.micro_batch_size={setup['micro_batch_size']})"
            ]
            if setup["micro_batch_size"] != setup["recipe_micro_batch_size"]
            else []
        ),
        f"per GPU with the recipe's settings (student ZeRO-{setup['student_zero_stage']}, "
        f"teacher {setup['teacher_placement']}, hpZ group {setup['hpz_partition_size']}, "
        f"offload: {offload}, activation checkpointing "
        f"{checkpointing}) at micro-batch "
        f"{setup['micro_batch_size']} x {setup['seq_len']} tokens:",
    ]
    for name, value in parts.items():
        if name != "total":
            lines.append(f"  {name.replace('_', ' '):<22} {gib(value):>12}")
    verdict = "fits" if plan["fits"] else "DOES NOT FIT"
    lines.append(
        f"  {'total':<22} {gib(parts['total']):>12} of {gib(plan['budget_bytes'])}: {verdict}"
    )
    lines += [
        f"  host memory per node    {gib(plan['host_bytes_per_node']):>11}",
        *_cache_lines(plan["teacher_cache_bytes_per_token"], setup["cached_states"]),
        "",
        "options, fastest first: largest micro-batch that fits (and the largest that splits "
        f"global_batch_size {setup['global_batch_size']} over {setup['gpus']} GPU(s)), "
        "host memory per node",
        f"  {'student':<8} {'offload':<16} {'checkpointing':<14} {'micro-batch':>11} "
        f"{'valid':>6} {'host':>12}",
    ]
    for option in plan["options"]:
        offload, checkpointing = _option_name(option)
        lines.append(
            f"  {'ZeRO-' + str(option['student_zero_stage']):<8} {offload:<16} {checkpointing:<14} "
            f"{option['largest_micro_batch']:>11} "
            f"{option['largest_valid_micro_batch']:>6} {gib(option['host_bytes_per_node']):>12}"
        )
    lines.append("")
    recommended = plan["recommended"]
    if recommended is not None:
        offload, checkpointing = _option_name(recommended)
        lines.append(
            f"fastest option that fits micro-batch {setup['micro_batch_size']}: offload "
            f"{offload}, checkpointing {checkpointing}:"
        )
        changed = setup["micro_batch_size"] != setup["recipe_micro_batch_size"]
        flags = option_overrides(recommended, setup["micro_batch_size"] if changed else None)
        lines.append("  " + " ".join(f"--set {value}" for value in flags))
        if recommended["offload_optimizer"]:
            lines.append("  (torch_adam=false: DeepSpeed's CPU Adam, compiled on first use: g++)")
    elif any(option["largest_micro_batch"] for option in plan["options"]):
        lines.append(
            f"micro-batch {setup['micro_batch_size']} fits no option: lower "
            "train.micro_batch_size to one of the table's (gradient accumulation keeps "
            "global_batch_size)"
        )
    else:
        lines.append(
            "This setup cannot fit, not even micro-batch 1 with everything offloaded: use more "
            "GPUs (--gpus), a shorter data.seq_len, a smaller loss.chunk_size or a smaller student."
        )
    return "\n".join(lines)


def _hardware(args: argparse.Namespace) -> Hardware:
    """The time model's machine from the command line (UsageError naming a bad flag)."""
    name = args.gpu.lower()
    try:
        peak = GPUS[name] if name in GPUS else float(name)
    except ValueError:
        raise UsageError(
            f"--gpu {args.gpu}: name one of {', '.join(GPUS)} or give its peak bf16 TFLOP/s"
        ) from None
    if not 0 < args.mfu <= 1:
        raise UsageError(f"--mfu {args.mfu}: a fraction of the peak, in (0, 1]")
    if min(peak, args.intra_node_bw, args.inter_node_bw) <= 0:
        raise UsageError("--gpu, --intra-node-bw and --inter-node-bw must be positive")
    return Hardware(peak, args.mfu, args.intra_node_bw, args.inter_node_bw)


def format_time(cost: dict, setup: dict | Setup, gpu: str) -> str:
    """The time model's part of the plan (tail_kd/cost_model.py), in words and numbers."""
    setup = asdict(setup) if not isinstance(setup, dict) else setup
    hw, per_token = cost["hardware"], cost["flops_per_token"]
    nodes = setup["gpus"] // setup["gpus_per_node"]
    lines = [
        "",
        f"time per step (student ZeRO-{setup['student_zero_stage']}, teacher "
        f"{setup['teacher_placement']}"
        + (f", hpZ over {setup['hpz_partition_size']}" if setup["hpz_partition_size"] != 1 else "")
        + "; "
        f"{setup['gpus']} x {gpu} at "
        f"{hw['peak_tflops']:g} TFLOP/s peak, assumed MFU {hw['mfu']:.0%}):",
        "  FLOPs per token: teacher forward {:.2f} G, student forward+backward {:.2f} G, "
        "recompute {:.2f} G, lm_heads {:.2f} G".format(
            *(
                per_token[k] / 1e9
                for k in ("teacher_forward", "student_forward_backward", "recompute", "lm_heads")
            )
        ),  # fmt: skip
        f"  compute: {cost['flops_per_step_per_gpu']['total'] / 1e12:.1f} TFLOP per GPU per step "
        f"({cost['accumulation']} micro-batches) -> {cost['compute_seconds']:.2f} s",
    ]
    if setup["gpus"] > 1:
        between = cost["received_between_nodes_bytes_per_step_per_gpu"]
        hw_links = f"{hw['intra_node_gbps']:g} GB/s within the node"
        if nodes > 1:
            hw_links = (
                f"{hw['inter_node_gbps']:g} GB/s between nodes ({between / 1e9:.2f} GB) and "
                + hw_links
            )
        logged = ", ".join(
            f"{name} {value / 1e9:.2f} GB" for name, value in cost["logged_bytes_per_step"].items()
        )
        lines += [
            f"  communication: each GPU receives {cost['received_bytes_per_step_per_gpu'] / 1e9:.2f}"
            f" GB per step -> {cost['communication_seconds']:.2f} s at {hw_links}",
            f"  (DeepSpeed's comms logger would count: {logged}; check with "
            "--set deepspeed.comms_logger.enabled=true, TensorBoard comm/*)",
        ]
    else:
        lines.append("  communication: none (one GPU)")
    lines.append(
        f"  step: {cost['step_seconds']:.2f} s with the collectives hidden behind compute "
        f"({cost['step_seconds_without_overlap']:.2f} s without); "
        f"{cost['tokens_per_second']:,.0f} tokens/s"
    )
    if "states_read_gbps_per_node" in cost:
        lines.append(
            f"  teacher states read from disk: {cost['states_read_gbps_per_node']:.2f} GB/s per "
            "node at that speed (slower storage makes the step wait)"
        )
    budget = cost.get("budget")
    if budget:
        lines.append(
            f"  {budget['tokens'] / 1e9:.2f}B tokens ({budget['steps']:,.0f} steps): "
            f"{budget['gpu_hours']:,.0f} GPU-hours, {budget['days']:.1f} days on "
            f"{setup['gpus']} GPU(s)"
        )
    return "\n".join(lines)


def _cache_lines(per_token: int, cached: bool) -> list[str]:
    """What `tail-kd cache-teacher` writes for this recipe (nothing without a teacher)."""
    if per_token == 0:
        return []
    use = "read by this recipe" if cached else "teacher.cached_states: true reads them"
    return [
        f"  teacher states on disk  {per_token} B per token = {per_token * 1e6 / GIB:.2f} GiB "
        f"per 1M tokens, {per_token * 1e9 / 2**40:.2f} TiB per 1B tokens (tail-kd "
        f"cache-teacher; {use})"
    ]


def _local_gpu_memory_gib() -> float | None:
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / GIB
    return None


if __name__ == "__main__":
    sys.exit(main())
