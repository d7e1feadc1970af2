"""tail_kd/cost_model.py against what really happens: its FLOPs against torch's FLOP counter on a
real forward and backward of the tiny pair through the fused loss, and its bytes per step against
DeepSpeed's own communication logger in real ZeRO-3 runs on 4 CPU ranks (logged by the trainer
as comm/* in TensorBoard), each within 10% (the 2-rank runs of every placement are checked in
tests/test_train.py); and `auto`'s choice of placement."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from helpers import REPO
from tail_kd.config import load_recipe
from tail_kd.cost_model import Hardware, micro_batch_flops, step_cost
from tail_kd.memory_plan import (
    estimate,
    model_shape,
    placement_candidates,
    plan_configs,
    setup_of,
)
from test_train import launch

RECIPE = REPO / "recipes" / "tiny" / "tad.yaml"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The tiny teacher and data, built once (what training's start does)."""
    from tail_kd.prepare import prepare

    cache = tmp_path_factory.mktemp("cost") / "cache"
    prepare(load_recipe(RECIPE, [f"cache_dir={cache}"]), check=False)
    return cache


def plan(cache, ranks: int, *sets: str):
    recipe = load_recipe(RECIPE, [f"cache_dir={cache}", *sets])
    teacher, student = plan_configs(recipe)
    setup = setup_of(recipe, device="cpu", gpus=ranks, gpus_per_node=ranks)
    return recipe, teacher, student, setup


@pytest.mark.parametrize("checkpointing", [False, True])
def test_flops_match_torchs_flop_counter(cache, checkpointing):
    """One micro-batch: the teacher's forward, the student's forward, the fused loss and the
    backward, counted by torch.utils.flop_counter (eager attention: its matmuls are counted; the
    CPU's fused attention kernel is not), against `micro_batch_flops`."""
    from transformers import AutoModelForCausalLM

    from tail_kd.distiller import loss_function
    from tail_kd.losses import LossInputs
    from tail_kd.pair import plan_models

    sets = [f"train.activation_checkpointing={str(checkpointing).lower()}"]
    recipe, teacher_config, student_config, setup = plan(cache, 1, *sets)
    teacher, student = (
        AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        for config in (teacher_config, student_config)
    )
    if checkpointing:
        student.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    student.train()
    loss_fn = loss_function(recipe.loss, plan_models(recipe), "cpu", recipe.data)
    b, t = setup.micro_batch_size, setup.seq_len
    ids = torch.randint(
        0, teacher_config.vocab_size, (b, t), generator=torch.Generator().manual_seed(0)
    )
    mask = torch.ones_like(ids)
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            teacher_hidden = teacher.base_model(
                input_ids=ids, attention_mask=mask
            ).last_hidden_state
        hidden = student.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        out = loss_fn(
            *LossInputs(
                student_hidden=hidden[:, :-1],
                student_weight=student.get_output_embeddings().weight,
                teacher_hidden=teacher_hidden[:, :-1],
                teacher_weight=teacher.get_output_embeddings().weight,
                labels=ids[:, 1:],
            )
        )
        out.loss.backward()
    counted = counter.get_total_flops()
    predicted = micro_batch_flops(
        model_shape(student_config), model_shape(teacher_config), setup, b
    )
    assert predicted["recompute"] > 0 if checkpointing else predicted["recompute"] == 0
    assert predicted["total"] == pytest.approx(counted, rel=0.10), (predicted, counted)


@pytest.fixture(scope="module")
def logged_runs(cache, tmp_path_factory) -> dict:
    """Real runs with DeepSpeed's communication logger on: 4 ranks with vocab-parallel heads (1
    micro-batch per step), the same with hpZ over pairs of ranks (and 2 micro-batches of 1 per
    step). (The 2-rank runs of every placement are checked in tests/test_train.py.)"""
    root = tmp_path_factory.mktemp("comms")
    logger = ["deepspeed.comms_logger.enabled=true", "train.steps=3", "eval.every=0",
              "checkpoint.every=0"]  # fmt: skip
    vocab_parallel = ["parallel.vocab_parallel_size=2"]
    cases = {
        "vocab-parallel-4": (4, vocab_parallel),
        "hpz-4": (
            4,
            [*vocab_parallel, "parallel.hpz_partition_size=2", "train.micro_batch_size=1"],
        ),
    }
    runs = {}
    for name, (ranks, sets) in cases.items():
        run = launch(root / name, cache, [*logger, *sets], ranks=ranks)
        run.assert_finished(3)
        runs[name] = (ranks, sets, run)
    return runs


@pytest.mark.parametrize("case", ["vocab-parallel-4", "hpz-4"])
def test_bytes_per_step_match_deepspeeds_logger(cache, logged_runs, case):
    """Steps 2 and 3 (the first step gathers module by module while ZeRO-3 traces the model)."""
    ranks, sets, run = logged_runs[case]
    recipe, teacher, student, setup = plan(cache, ranks, *sets)
    predicted = step_cost(model_shape(student), model_shape(teacher), setup, Hardware())
    scalars = run.scalars()
    for name, value in predicted["logged_bytes_per_step"].items():
        measured = [v for step, v in scalars[f"comm/{name}"] if step >= 2]
        assert len(measured) == 2, (name, scalars[f"comm/{name}"])
        for v in measured:
            assert value == pytest.approx(v, rel=0.10), (case, name, value, v)
    logged = {tag.removeprefix("comm/") for tag in scalars if tag.startswith("comm/")}
    assert logged <= set(predicted["logged_bytes_per_step"]) | {"broadcast"}, logged


def test_hpz_changes_what_is_gathered_not_the_run(logged_runs):
    """ZeRO++'s hpZ over pairs of the 4 ranks (two "nodes"), 2 micro-batches of 1 per step: the
    same losses and gradient norms as without it (1 micro-batch of 2), while the ranks gather from
    their pair's partition (the bytes as planned: `test_bytes_per_step_match_deepspeeds_logger`)."""
    *_, plain = logged_runs["vocab-parallel-4"]
    *_, hpz = logged_runs["hpz-4"]
    assert "hpZ over 2 ranks" in hpz.proc.stdout, hpz.output
    expected, got = plain.scalars(), hpz.scalars()
    for tag in ("train/loss", "train/grad_norm"):
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in expected[tag]], rel=1e-5)


def test_plan_prints_the_time_of_a_recipe_and_its_token_budget(capsys, tmp_path):
    """`tail-kd plan`'s time section for the paper's recipe, offline, on 1 and on 8 GPUs: the
    flags reach the model, 8 GPUs cost communication that 1 does not, the budget is the recipe's
    tokens unless --tokens says otherwise."""
    from tail_kd.memory_plan import main

    recipe = REPO / "recipes" / "paper" / "qwen1.5-1.8b-to-1.2b.yaml"
    costs = {}
    for gpus, args in ((1, []), (8, ["--gpu", "a100", "--mfu", "0.5", "--tokens", "1e9"])):
        out = tmp_path / f"{gpus}.json"
        main([str(recipe), "--gpus", str(gpus), "--json", str(out), *args])
        costs[gpus] = json.loads(out.read_text())["time"]
        printed = capsys.readouterr().out
        assert f"{gpus} x {'h100' if gpus == 1 else 'a100'}" in printed and "GPU-hours" in printed
    one, eight = costs[1], costs[8]
    assert one["budget"]["tokens"] == 15000 * 128 * 1024
    assert eight["budget"]["tokens"] == 1e9
    assert eight["hardware"]["peak_tflops"] == 312.0 and eight["hardware"]["mfu"] == 0.5
    assert one["communication_seconds"] == 0 and eight["communication_seconds"] > 0
    # The same tokens per step: 8 GPUs share the FLOPs.
    assert eight["flops_per_step_per_gpu"]["total"] * 8 == pytest.approx(
        one["flops_per_step_per_gpu"]["total"]
    )


def test_plan_refuses_a_gpu_it_does_not_know(capsys):
    from tail_kd.memory_plan import main

    recipe = REPO / "recipes" / "paper" / "qwen1.5-1.8b-to-1.2b.yaml"
    assert main([str(recipe), "--gpu", "h800x"]) == 2
    assert "--gpu h800x: name one of h100" in capsys.readouterr().err


@pytest.mark.parametrize("memory, device, placement, stage", [
    (80, "cuda", "replicated", 1), (16, "cuda", "replicated", 3), (12, "cuda", "zero3", 3),
    (80, "cpu", "zero3", 3)])  # fmt: skip
def test_auto_takes_the_fastest_placement_that_fits(tmp_path, memory, device, placement, stage):
    """parallel.teacher_placement and parallel.student_zero_stage auto, the paper's recipe on 8
    GPUs: on 80 GiB a whole bf16 teacher and a ZeRO-1 student (whole weights and gradients) fit
    beside the rest; on 16 GiB only the whole teacher; on 12 GiB neither. Of every explicit
    placement that fits, none is predicted faster than the one chosen. CPU ranks keep both
    ZeRO-3."""
    from tail_kd.memory_plan import main

    recipe = REPO / "recipes" / "paper" / "qwen1.5-1.8b-to-1.2b.yaml"
    args = [str(recipe), "--gpus", "8", "--gpu-memory", str(memory), "--device", device]
    out = tmp_path / "plan.json"
    main([*args, "--json", str(out)])
    plan = json.loads(out.read_text())
    chosen_setup = plan["setup"]
    assert chosen_setup["teacher_placement"] == placement
    assert chosen_setup["student_zero_stage"] == stage
    assert chosen_setup["hpz_partition_size"] == 1  # one node
    chosen = plan["time"]["step_seconds_without_overlap"]
    received = plan["time"]["received_bytes_per_step_per_gpu"]
    if device == "cpu":
        return
    budget = memory * 2**30
    loaded = load_recipe(recipe)
    teacher, student = (model_shape(config) for config in plan_configs(loaded))
    setup = setup_of(loaded, device="cuda", gpus=8, gpus_per_node=8)
    times = {}
    for other in ("replicated", "zero3"):
        for other_stage in (1, 2, 3):
            variant = dataclasses.replace(
                setup,
                teacher_placement=other,
                student_zero_stage=other_stage,
                hpz_partition_size=1,
            )
            if estimate(student, teacher, variant, setup.micro_batch_size)["total"] <= budget:
                cost = step_cost(student, teacher, variant, Hardware())
                times[other, other_stage] = cost["step_seconds_without_overlap"]
    assert times[placement, stage] == pytest.approx(chosen) == min(times.values()), times
    # ZeRO-3 for both gathers everything at every micro-batch: the most bytes
    if (placement, stage) != ("zero3", 3):
        variant = dataclasses.replace(
            setup, teacher_placement="zero3", student_zero_stage=3, hpz_partition_size=1
        )
        everything = step_cost(student, teacher, variant, Hardware())
        assert received < everything["received_bytes_per_step_per_gpu"]


def test_auto_placement_candidates():
    """Vocab-parallel heads read ZeRO-3's partitions and only ZeRO-3 offloads parameters: `auto`
    does not consider stages 1 and 2 there; explicit settings are the only candidates; hpZ is a
    candidate on jobs of several nodes, for placements with a ZeRO-3 engine; CPU ranks keep
    everything ZeRO-3."""
    recipe = load_recipe(REPO / "recipes" / "paper" / "qwen1.5-1.8b-to-1.2b.yaml")
    setup = setup_of(recipe, device="cuda", gpus=8, gpus_per_node=8)
    assert placement_candidates(setup) == [
        (t, s, 1) for t in ("replicated", "zero3") for s in (1, 2, 3)
    ]
    for change in ({"vocab_parallel_size": 2}, {"offload_param": True}):
        assert placement_candidates(dataclasses.replace(setup, **change)) == [
            ("replicated", 3, 1),
            ("zero3", 3, 1),
        ]
    fixed = dataclasses.replace(setup, teacher_placement="zero3", student_zero_stage=2)
    assert placement_candidates(fixed) == [("zero3", 2, 1)]
    assert placement_candidates(setup, teacher=False) == [(t, s, 1) for t, s in
                                                          [("zero3", 1), ("zero3", 2), ("zero3", 3)]]  # fmt: skip
    assert placement_candidates(dataclasses.replace(setup, device="cpu")) == [("zero3", 3, 1)]
    nodes = setup_of(recipe, device="cuda", gpus=32, gpus_per_node=8)
    assert placement_candidates(nodes)[:4] == [("replicated", 1, 1), ("replicated", 2, 1),
                                               ("replicated", 3, 1), ("replicated", 3, 8)]  # fmt: skip
    assert ("zero3", 1, 8) in placement_candidates(nodes)  # the ZeRO-3 teacher's gathers


def test_auto_takes_the_smallest_placement_when_nothing_fits():
    """Then the plan says DOES NOT FIT for the placement with the smallest estimate: both
    ZeRO-3, without hpZ's second partition."""
    from tail_kd.memory_plan import choose_placement

    recipe = load_recipe(REPO / "recipes" / "paper" / "qwen1.5-1.8b-to-1.2b.yaml")
    teacher, student = (model_shape(config) for config in plan_configs(recipe))
    setup = setup_of(recipe, device="cuda", gpus=32, gpus_per_node=8)
    assert choose_placement(student, teacher, setup, budget=1) == ("zero3", 3, 1)


def test_auto_takes_hpz_on_several_nodes(tmp_path):
    """4 nodes of 8 GPUs, a ZeRO-3 teacher: with hpZ over the node its gathers stay within the
    node, predicted faster, so `auto` takes it; between nodes only the student's gradients and
    gathers remain. With a replicated teacher and one micro-batch per step hpZ would gather
    nothing within the node (the student's first gather after a step is over all ranks): off."""
    from tail_kd.memory_plan import main

    recipe = REPO / "recipes" / "paper" / "qwen1.5-1.8b-to-1.2b.yaml"
    nodes = [str(recipe), "--gpus", "32", "--gpus-per-node", "8"]
    plans = {}
    for name, sets in (("auto", []), ("off", ["parallel.hpz_partition_size=1"])):
        out = tmp_path / f"{name}.json"
        teacher = ["--set", "parallel.teacher_placement=zero3"]
        main([*nodes, *teacher, "--json", str(out), *(f"--set={v}" for v in sets)])
        plans[name] = json.loads(out.read_text())
    assert plans["auto"]["setup"]["hpz_partition_size"] == 8
    between = [p["time"]["received_between_nodes_bytes_per_step_per_gpu"] for p in plans.values()]
    assert between[0] < 0.7 * between[1]
    seconds = [p["time"]["step_seconds_without_overlap"] for p in plans.values()]
    assert seconds[0] < seconds[1]
    replicated = tmp_path / "replicated.json"
    main([*nodes, "--json", str(replicated)])
    setup = json.loads(replicated.read_text())["setup"]
    assert (setup["teacher_placement"], setup["hpz_partition_size"]) == ("replicated", 1)
