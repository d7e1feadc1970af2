"""`tail-kd plan` (tail_kd/memory_plan.py): its parts against measurements, and the command.

- the activation formula against what autograd really saves (saved-tensor hooks) in Hugging Face
  Llama and Qwen2 layers, float32 and bf16;
- parameter counts against instantiated models;
- the whole estimate against the peak memory of a real one-rank ZeRO-3 run on the CPU
  (tools/bench_train.py --memory, the quickstart's SmolLM2-135M teacher), at two micro-batches;
- the command on the shipped recipes, offline (it reads the configs tail-kd ships for their hub
  models): each academic recipe's memory settings are the plan's fastest option for the GPU it is
  written for; a micro-batch that does not split the global batch is replaced, and said so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from tail_kd.config import load_recipe
from tail_kd.memory_plan import (
    OPTIONS,
    activation_bytes_per_token_layer,
    estimate,
    largest_micro_batch,
    main,
    model_shape,
    option_overrides,
    setup_of,
)
from tail_kd.models.shipped import SHIPPED_CONFIGS

REPO = Path(__file__).resolve().parent.parent
ACADEMIC = REPO / "recipes" / "academic"


def small_config(kind: str, layers: int):
    if kind == "llama-gqa":  # SmolLM2-135M's layer shape
        return LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                           num_key_value_heads=3, num_hidden_layers=layers, vocab_size=512)  # fmt: skip
    if kind == "llama-mha":
        return LlamaConfig(hidden_size=256, intermediate_size=1024, num_attention_heads=4,
                           num_key_value_heads=4, num_hidden_layers=layers, vocab_size=512)  # fmt: skip
    return Qwen2Config(hidden_size=256, intermediate_size=704, num_attention_heads=4,
                       num_key_value_heads=2, num_hidden_layers=layers, vocab_size=512)  # fmt: skip


def saved_activation_bytes(model, batch: int, seq_len: int) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in a training forward."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.model(input_ids=ids, use_cache=False)
    return sum(saved.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["llama-gqa", "llama-mha", "qwen2"])
def test_activation_formula_matches_what_autograd_saves(kind, dtype):
    torch.manual_seed(0)
    batch, seq_len = 2, 64
    measured = []
    for layers in (1, 3):  # the difference is two layers' worth
        config = small_config(kind, layers)
        config._attn_implementation = "sdpa"
        model = AutoModelForCausalLM.from_config(config).to(dtype)
        measured.append(saved_activation_bytes(model, batch, seq_len))
    per_layer = (measured[1] - measured[0]) / 2 / (batch * seq_len)
    formula = activation_bytes_per_token_layer(model_shape(config), dtype.itemsize)
    assert formula == pytest.approx(per_layer, rel=0.01)


@pytest.mark.parametrize("tied", [True, False])
def test_model_shape_counts_parameters_without_building_the_model(tied):
    config = small_config("llama-gqa", 2)
    config.tie_word_embeddings = tied
    model = AutoModelForCausalLM.from_config(config)
    shape = model_shape(config)
    assert shape.parameters == sum(p.numel() for p in model.parameters())
    assert shape.largest_layer == 576 * 1536  # one MLP projection: the largest module here
    assert (shape.layers, shape.hidden, shape.kv_width, shape.heads) == (2, 576, 192, 9)
    assert shape.vocab_rows == 512


def test_largest_micro_batch_is_the_boundary():
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml")
    setup = setup_of(recipe, device="cuda", gpus=1, gpus_per_node=1)
    student = model_shape(small_config("llama-gqa", 6))
    teacher = model_shape(small_config("llama-gqa", 30))
    budget = 3 * 2**30
    limit = largest_micro_batch(student, teacher, setup, budget)
    assert limit > 1
    assert estimate(student, teacher, setup, limit)["total"] <= budget
    assert estimate(student, teacher, setup, limit + 1)["total"] > budget
    assert largest_micro_batch(student, teacher, setup, 2**20) == 0


def test_vocab_parallel_divides_the_heads_and_the_loss_chunk():
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", ["train.global_batch_size=8"])
    student = model_shape(small_config("llama-gqa", 6))
    teacher = model_shape(small_config("llama-gqa", 30))
    plain = setup_of(recipe, device="cuda", gpus=4, gpus_per_node=4)
    recipe.parallel.vocab_parallel_size = 4
    split = setup_of(recipe, device="cuda", gpus=4, gpus_per_node=4)
    before, after = estimate(student, teacher, plain, 2), estimate(student, teacher, split, 2)
    assert after["lm_heads"] == before["lm_heads"] // 4
    assert after["loss_chunk"] == before["loss_chunk"] // 4
    for name in ("student_model_states", "teacher_parameters", "student_activations"):
        assert after[name] == before[name], name


# ---------------------------------------------------------------------------------------------
# Against a real run
# ---------------------------------------------------------------------------------------------


def bench_memory(tmp_path: Path, micro_batch: int) -> dict:
    out = tmp_path / f"bench-{micro_batch}.json"
    command = [sys.executable, str(REPO / "tools" / "bench_train.py"),
               str(REPO / "recipes" / "quickstart.yaml"), "--steps", "1", "--losses", "tad",
               "--memory", "--json", str(out), "--set", f"train.micro_batch_size={micro_batch}",
               "--set", f"train.global_batch_size={micro_batch}"]  # fmt: skip
    # Freed buffers leave the resident set at once: its high-water mark is the peak in use.
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    memory = json.loads(out.read_text())["memory"]
    return {"measured": memory["measured_bytes"], "estimate": memory["estimate_bytes"]["total"]}


def test_estimate_against_the_measured_peak_of_a_cpu_run(tmp_path):
    small, large = bench_memory(tmp_path, 2), bench_memory(tmp_path, 8)
    for run in (small, large):  # above the peak, by less than half
        assert 1.0 <= run["estimate"] / run["measured"] <= 1.5, run
    # What grows with the micro-batch (activations, the loss chunk) grows as estimated.
    growth = large["measured"] - small["measured"]
    assert growth > 0
    assert (large["estimate"] - small["estimate"]) / growth == pytest.approx(1.0, abs=0.25)


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def run_plan(capsys, tmp_path: Path, recipe: Path, *args: str) -> tuple[int, dict | None, str]:
    """`tail-kd plan RECIPE --json FILE ARGS`: (exit status, the JSON plan or None, the output)."""
    out = tmp_path / "plan.json"
    out.unlink(missing_ok=True)
    status = main([str(recipe), "--json", str(out), *args])
    text = capsys.readouterr()
    plan = json.loads(out.read_text()) if out.exists() else None
    return status, plan, text.out + text.err


@pytest.mark.parametrize(
    "name, gpu_memory",
    [("qwen1.5-1.8b-to-1.2b.yaml", 80), ("qwen1.5-1.8b-to-0.5b.yaml", 24)],
)
def test_academic_recipes_take_the_plans_fastest_option(capsys, tmp_path, name, gpu_memory):
    recipe = ACADEMIC / name
    status, plan, text = run_plan(capsys, tmp_path, recipe, "--gpu-memory", str(gpu_memory))
    assert status == 0 and plan["fits"], text
    assert plan["teacher"]["parameters"] == 1_836_828_672  # Qwen1.5-1.8B
    setup, chosen = plan["setup"], plan["recommended"]
    for key in ("offload_optimizer", "offload_param", "activation_checkpointing"):
        assert chosen[key] == setup[key], (key, text)
    assert (
        setup["student_bytes"] == 2 and setup["micro_batch_size"] <= chosen["largest_micro_batch"]
    )
    assert "fastest option that fits" in text


def test_plan_says_plainly_when_nothing_fits(capsys, tmp_path):
    recipe = ACADEMIC / "qwen1.5-1.8b-to-1.2b.yaml"
    status, plan, text = run_plan(capsys, tmp_path, recipe, "--gpu-memory", "3")
    assert status == 1 and not plan["fits"]
    assert all(option["largest_micro_batch"] == 0 for option in plan["options"])
    assert "DOES NOT FIT" in text and "This setup cannot fit" in text


def test_plan_rejects_bad_input_before_reading_models(capsys, tmp_path):
    recipe = ACADEMIC / "qwen1.5-1.8b-to-1.2b.yaml"
    status, _, text = run_plan(capsys, tmp_path, recipe, "--gpus", "3", "--gpus-per-node", "2")
    assert status == 2 and "--gpus-per-node" in text
    status, _, text = run_plan(capsys, tmp_path, recipe, "--gpus", "3")
    assert status == 2 and "global_batch_size: 128 sequences do not split evenly over 3" in text
    status, _, text = run_plan(capsys, tmp_path, recipe, "--set", "teacher.path=/nonexistent/model")
    assert status == 2 and "/nonexistent/model" in text


def test_plan_works_offline_for_every_shipped_hub_recipe(tmp_path):
    """With the hub unreachable (HF_HUB_OFFLINE=1, as on a compute node) the plan of every shipped
    recipe that names hub models reads the configs tail-kd ships, and their shapes are the
    models' (parameter counts as the model cards give them)."""
    parameters = {}
    for recipe in sorted((REPO / "recipes").rglob("*.yaml")):
        if "Qwen/" not in recipe.read_text():
            continue
        out = tmp_path / f"{recipe.stem}.json"
        proc = subprocess.run(
            [sys.executable, "-m", "tail_kd.cli", "plan", str(recipe), "--json", str(out)],
            cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        assert proc.returncode in (0, 1), proc.stderr  # 1: does not fit 80 GB (still a plan)
        plan = json.loads(out.read_text())
        parameters[recipe.parent.name, recipe.stem] = (
            plan["teacher"]["parameters"],
            plan["student"]["parameters"],
        )
    assert parameters[("maths", "sft-gsm")] == (1_543_714_304, 494_032_768)  # Qwen2.5 1.5B, 0.5B
    assert parameters[("paper", "qwen1.5-1.8b-to-1.2b")][0] == 1_836_828_672  # Qwen1.5-1.8B
    assert len(parameters) == 4


def test_plan_chooses_a_micro_batch_that_splits_the_global_batch(capsys, tmp_path):
    """32 GPUs and the academic recipe's micro-batch 16: 16 x 32 does not divide 128, so the plan
    plans with micro-batch 4 and says so, with the flag."""
    recipe = ACADEMIC / "qwen1.5-1.8b-to-1.2b.yaml"
    status, plan, text = run_plan(capsys, tmp_path, recipe, "--gpus", "32",
                                  "--gpus-per-node", "8")  # fmt: skip
    assert status == 0, text
    setup = plan["setup"]
    assert (setup["recipe_micro_batch_size"], setup["micro_batch_size"]) == (16, 4)
    assert "the recipe's 16 does not split global_batch_size 128 over 32 GPUs" in text
    assert "--set train.micro_batch_size=4" in text.split("fastest option")[1]


def test_teacher_and_student_configs_can_be_given(capsys, tmp_path):
    """--teacher-config / --student-config replace the recipe's models' configs."""
    source = json.loads((SHIPPED_CONFIGS / "Qwen" / "Qwen1.5-1.8B" / "config.json").read_text())
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "config.json").write_text(
        json.dumps({**source, "num_hidden_layers": 12})
    )
    student = tmp_path / "student.json"
    student.write_text(json.dumps({**source, "num_hidden_layers": 2, "hidden_size": 256,
                                   "intermediate_size": 512, "num_attention_heads": 4,
                                   "num_key_value_heads": 4}))  # fmt: skip
    recipe = REPO / "recipes" / "maths" / "sft-gsm.yaml"
    status, plan, text = run_plan(capsys, tmp_path, recipe, "--teacher-config",
                                  str(tmp_path / "teacher"), "--student-config", str(student))  # fmt: skip
    assert status == 0, text
    assert plan["teacher"]["layers"] == 12 and plan["student"]["layers"] == 2


def test_offloading_the_optimizer_comes_with_deepspeeds_cpu_adam():
    """The plan is the one place that gives the CPU Adam advice: every option that offloads the
    optimizer selects it; the others leave the optimizer alone."""
    for offload_optimizer, offload_param, checkpointing in OPTIONS:
        option = {"offload_optimizer": offload_optimizer, "offload_param": offload_param,
                  "activation_checkpointing": checkpointing}  # fmt: skip
        flags = option_overrides(option)
        assert ("deepspeed.optimizer.params.torch_adam=false" in flags) == offload_optimizer
    for text in [
        (REPO / "slurm" / "README.md").read_text(),
        *(recipe.read_text() for recipe in (REPO / "recipes").rglob("*.yaml")),
    ]:
        assert "torch_adam" not in text  # they point to `tail-kd plan` instead of repeating it
