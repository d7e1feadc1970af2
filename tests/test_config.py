"""Recipe loading: defaults, overrides, every class of error, round trips."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from tail_kd.config import Recipe, RecipeError, apply_overrides, load_recipe

MINIMAL = {"teacher": {"path": "models/teacher"}, "data": {"source": "data/train.jsonl"}}


def write_recipe(tmp_path, data, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def with_section(section, **fields):
    """MINIMAL with `fields` merged into `section` (the root when section is None)."""
    data = json.loads(json.dumps(MINIMAL))
    target = data if section is None else data.setdefault(section, {})
    target.update(fields)
    return data


# --- defaults and resolved directories ----------------------------------------------------------


def test_defaults_and_resolved_directories(monkeypatch):
    monkeypatch.delenv("TAIL_KD_CACHE", raising=False)
    recipe = Recipe.from_dict(with_section(None, run_name="quick"))
    assert recipe.output_dir == "runs/quick"
    home_cache = os.path.join(os.path.expanduser("~"), ".cache", "tail_kd")
    assert recipe.cache_dir == home_cache
    assert recipe.data.cache_dir == os.path.join(home_cache, "data")
    assert recipe.log.tensorboard_dir == "runs/quick/tensorboard"
    assert recipe.loss.divergence == "tad" and recipe.loss.k == 10 and recipe.loss.beta == 2.0
    assert recipe.train.betas == (0.9, 0.95)


def test_explicit_directories_are_kept_and_the_cache_does_not_follow_the_output_dir(monkeypatch):
    recipe = Recipe.from_dict(
        with_section(None, output_dir="/scratch/exp1", cache_dir="/scratch/cache")
    )
    assert recipe.log.tensorboard_dir == "/scratch/exp1/tensorboard"
    assert recipe.data.cache_dir == "/scratch/cache/data"
    # `tail-kd prepare-data` and a job with another output dir find the same cache.
    monkeypatch.setenv("TAIL_KD_CACHE", "/shared/tail-kd-cache")
    first = Recipe.from_dict(with_section(None, output_dir="/scratch/exp1"))
    second = Recipe.from_dict(with_section(None, output_dir="/elsewhere/exp2"))
    assert first.cache_dir == second.cache_dir == "/shared/tail-kd-cache"


# --- loading and overrides ----------------------------------------------------------------------


def test_load_recipe_applies_nested_overrides(tmp_path):
    path = write_recipe(tmp_path, with_section("train", lr=1e-4))
    recipe = load_recipe(
        path,
        [
            "train.lr=3e-4",
            "loss.k=5",
            "loss.normalize=false",
            "train.betas=[0.8, 0.99]",
            "data.source=[a.txt, b/]",
            "teacher.gguf_file=null",
            "deepspeed.zero_optimization.stage=3",
            "run_name=sweep-k5",
        ],
    )
    assert recipe.train.lr == pytest.approx(3e-4)
    assert recipe.loss.k == 5 and recipe.loss.normalize is False
    assert recipe.train.betas == (0.8, 0.99)
    assert recipe.data.source == ["a.txt", "b/"]
    assert recipe.deepspeed == {"zero_optimization": {"stage": 3}}
    assert recipe.output_dir == "runs/sweep-k5"


def test_override_creates_missing_sections_and_leaves_input_untouched():
    data = {"teacher": {"path": "t"}, "data": {"source": "d.txt"}, "loss": None}
    updated = apply_overrides(data, ["loss.beta=5", "eval.every=0"])
    assert updated["loss"] == {"beta": 5} and updated["eval"] == {"every": 0}
    assert data["loss"] is None and "eval" not in data


def test_float_written_without_dot_is_a_number(tmp_path):
    # YAML 1.1 reads `1e-4` (no dot) as a string; a recipe field typed float accepts it anyway.
    path = write_recipe(tmp_path, "teacher: {path: t}\ndata: {source: d.txt}\ntrain: {lr: 1e-4}\n")
    assert load_recipe(path).train.lr == pytest.approx(1e-4)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr_sched=cosine", "unknown key 'train.lr_sched' (did you mean 'train.lr'?)"),
        ("lr=3e-4", "unknown key 'lr' (did you mean 'train.lr'?)"),
        ("loss.kk=3", "unknown key 'loss.kk' (did you mean 'loss.k'?)"),
        ("train.lr.warmup=1", "train.lr is a value, not a section"),
        ("train.lr", "--set expects KEY=VALUE"),
        ("loss.k=[1, 2", "the value is not valid YAML"),
    ],
)
def test_bad_overrides(tmp_path, override, message):
    path = write_recipe(tmp_path, MINIMAL)
    with pytest.raises(RecipeError) as error:
        load_recipe(path, [override])
    assert message in str(error.value)
    assert str(error.value).startswith("--set ")  # the mistake is on the command line
    assert str(path) not in str(error.value)


def test_override_value_is_validated_like_the_file(tmp_path):
    path = write_recipe(tmp_path, MINIMAL)
    with pytest.raises(RecipeError, match=r"^--set loss.k: expected a positive integer, got -1"):
        load_recipe(path, ["loss.k=-1"])
    # A field the override did not set is the file's: a bad value there names the file.
    bad = write_recipe(tmp_path, with_section("data", source=7))
    with pytest.raises(RecipeError, match=r"recipe.yaml: data.source: expected a string"):
        load_recipe(bad, ["loss.k=3"])


def test_warm_up_longer_than_the_run_is_cut_with_a_note(tmp_path):
    train = load_recipe(write_recipe(tmp_path, MINIMAL), ["train.steps=1", "train.warmup_steps=10"])
    assert train.train.effective_warmup_steps == 1
    assert train.notes() == [
        "train.warmup_steps 10 is more than train.steps 1: the warm-up is cut to 1 steps"
    ]
    assert load_recipe(write_recipe(tmp_path, MINIMAL), ["train.warmup_steps=3"]).notes() == []


# --- file-level errors --------------------------------------------------------------------------


def test_missing_file_is_named(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found: .*nope.yaml"):
        load_recipe(tmp_path / "nope.yaml")


def test_yaml_syntax_error_shows_the_line(tmp_path):
    path = write_recipe(tmp_path, "teacher:\n  path: t\ndata:\n  source: [a.txt\n  seq_len: 3\n")
    with pytest.raises(RecipeError, match=r"recipe.yaml:5:\d+: invalid YAML"):
        load_recipe(path)


def test_top_level_must_be_a_mapping(tmp_path):
    path = write_recipe(tmp_path, "- teacher\n- data\n")
    with pytest.raises(
        RecipeError, match="expected a mapping of sections at the top level, got list"
    ):
        load_recipe(path)


def test_the_loss_chunk_covers_a_sequence_unless_set(tmp_path):
    """auto: data.seq_len, at least 1024 (a chunk holds whole sequences: no teacher pre-pass)."""
    for seq_len, chunk in ((256, 1024), (2048, 2048)):
        recipe = load_recipe(write_recipe(tmp_path, with_section("data", seq_len=seq_len)))
        assert recipe.loss.chunk_size == "auto"
        assert recipe.loss.chunk_tokens(recipe.data.seq_len) == chunk
    recipe = load_recipe(write_recipe(tmp_path, with_section("loss", chunk_size=512)))
    assert recipe.loss.chunk_tokens(2048) == 512


# --- field-level errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "section, fields, message",
    [
        ("loss", {"k": -1}, "loss.k: expected a positive integer, got -1"),
        ("loss", {"k": 0}, "loss.k: expected a positive integer, got 0"),
        ("loss", {"k": "ten"}, "loss.k: expected an integer, got 'ten'"),
        ("loss", {"k": 2.5}, "loss.k: expected an integer, got 2.5"),
        ("loss", {"beta": -0.5}, "loss.beta: expected a non-negative number, got -0.5"),
        ("loss", {"normalize": "yes please"}, "loss.normalize: expected true or false"),
        (
            "loss",
            {"divergence": "kl"},
            "loss.divergence: expected one of tad, forward_kl, reverse_kl, none; got 'kl'",
        ),
        ("loss", {"divergence": "tadd"}, "(did you mean 'tad'?)"),
        (
            "loss",
            {"divergence": "none", "ce_weight": 0},
            "loss.ce_weight: is 0 and divergence is none",
        ),
        ("loss", {"chunk_size": 0}, "loss.chunk_size: expected auto or >= 1, got 0"),
        ("loss", {"chunk_size": "big"}, "loss.chunk_size: expected an integer or one of auto"),
        ("train", {"lr": 0}, "train.lr: expected a positive number, got 0.0"),
        ("train", {"lr": "fast"}, "train.lr: expected a number, got 'fast'"),
        ("train", {"steps": 0}, "train.steps: expected a positive integer, got 0"),
        ("train", {"betas": [0.9]}, "train.betas: expected a list of 2 numbers"),
        ("train", {"betas": [0.9, 1.0]}, "train.betas: expected two numbers in [0, 1)"),
        (
            "train",
            {"min_lr_ratio": 1.5},
            "train.min_lr_ratio: expected a number in [0, 1], got 1.5",
        ),
        (
            "train",
            {"precision": "fp16"},
            "train.precision: expected one of auto, float32, bfloat16",
        ),
        (
            "train",
            {"lr_sched": "cosine"},
            "unknown key 'train.lr_sched' (did you mean 'train.lr'?)",
        ),
        ("data", {"seq_len": 1}, "data.seq_len: expected an integer >= 2, got 1"),
        ("data", {"eval_examples": -1}, "data.eval_examples: expected a non-negative integer"),
        ("data", {"kind": "chat"}, "data.kind: expected one of pretrain, sft; got 'chat'"),
        ("data", {"source": ""}, "data.source: must name a file"),
        ("data", {"source": [1, 2]}, "data.source: expected a string or a list of strings"),
        (
            "data",
            {"source": "gsm_symbolic", "kind": "sft"},
            "data.num_examples: required for the generated",
        ),
        (
            "data",
            {"source": "gsm_symbolic", "num_examples": 10},
            "data.kind: gsm_symbolic gives question/answer",
        ),
        ("data", {"source": ["gsm_symbolic", "x.txt"]}, "gsm_symbolic cannot be combined"),
        ("teacher", {"dtype": "float16"}, "teacher.dtype: expected one of auto, float32, bfloat16"),
        ("teacher", {"path": None}, "teacher.path: expected a string, got None"),
        ("student", {"init": "config"}, "student.path: required when init is 'config'"),
        ("student", {"num_layers": 0}, "student.num_layers: expected a positive integer"),
        ("checkpoint", {"keep": 0}, "checkpoint.keep: expected an integer >= 1, got 0"),
        ("eval", {"every": -1}, "eval.every: expected a non-negative integer"),
        (
            "parallel",
            {"student_zero_stage": 4},
            "parallel.student_zero_stage: expected one of auto, 1, 2, 3; got 4",
        ),
        ("parallel", {"student_zero_stage": True}, "expected one of auto, 1, 2, 3; got True"),
        (
            "parallel",
            {"hpz_partition_size": 0},
            "parallel.hpz_partition_size: expected auto or >= 1, got 0",
        ),
        (
            "parallel",
            {"student_zero_stage": 2, "vocab_parallel_size": 2},
            "parallel.vocab_parallel_size: 2 cannot be combined with "
            "parallel.student_zero_stage: 2 (vocab-parallel heads read the rows of ZeRO-3's",
        ),
        (None, {"device": "tpu"}, "device: expected one of auto, cuda, cpu; got 'tpu'"),
        (None, {"seed": -1}, "seed: expected a non-negative integer"),
        (None, {"run_name": "a/b"}, "run_name: expected a non-empty name without '/'"),
        (None, {"trian": {}}, "unknown key 'trian' (did you mean 'train'?)"),
        (None, {"train": [1, 2]}, "train: expected a mapping of fields"),
    ],
)
def test_invalid_fields_are_named(tmp_path, section, fields, message):
    path = write_recipe(tmp_path, with_section(section, **fields))
    with pytest.raises(RecipeError) as error:
        load_recipe(path)
    assert message in str(error.value)
    assert str(error.value).startswith(f"{path}: ")


@pytest.mark.parametrize(
    "missing, message",
    [
        ("teacher", "teacher: required for loss.divergence tad"),
        ("data", "data.source: required but missing"),
    ],
)
def test_required_fields(missing, message):
    data = dict(MINIMAL)
    del data[missing]
    with pytest.raises(RecipeError, match=rf"recipe: {message}"):
        Recipe.from_dict(data)


# --- batch split over ranks ---------------------------------------------------------------------


def test_micro_batch_must_divide_global_batch():
    with pytest.raises(RecipeError) as error:
        Recipe.from_dict(with_section("train", global_batch_size=8, micro_batch_size=3))
    assert "train.global_batch_size: 8 is not a multiple of train.micro_batch_size (3)" in str(
        error.value
    )
    assert "set train.micro_batch_size=2 or train.global_batch_size=9" in str(error.value)


def test_the_hpz_group_must_divide_the_ranks():
    data = with_section("parallel", hpz_partition_size=3)
    data["train"] = {"global_batch_size": 24, "micro_batch_size": 1}
    recipe = Recipe.from_dict(data)
    with pytest.raises(RecipeError, match="parallel.hpz_partition_size: 3 does not divide the 4"):
        recipe.check_world_size(4)
    recipe.check_world_size(6)


def test_check_world_size_names_both_fields_and_suggests_values():
    recipe = Recipe.from_dict(with_section("train", global_batch_size=12, micro_batch_size=3))
    recipe.check_world_size(2)
    assert recipe.gradient_accumulation_steps(1) == 4
    assert recipe.gradient_accumulation_steps(2) == 2
    assert recipe.gradient_accumulation_steps(4) == 1
    with pytest.raises(RecipeError) as error:
        recipe.check_world_size(3)
    message = str(error.value)
    assert "12 is not a multiple of train.micro_batch_size (3) x world size (3) = 9" in message
    assert message.startswith("train.global_batch_size: ")
    assert "train.micro_batch_size=2 or train.global_batch_size=18" in message
    with pytest.raises(RecipeError, match="set train.global_batch_size=24$"):
        recipe.gradient_accumulation_steps(8)
    with pytest.raises(RecipeError, match="world size must be a positive integer"):
        recipe.check_world_size(0)


# --- round trip ---------------------------------------------------------------------------------


def test_round_trip_through_yaml_and_json(tmp_path):
    recipe = load_recipe(
        write_recipe(tmp_path, MINIMAL),
        ["loss.k=5", "train.betas=[0.8, 0.9]", "deepspeed.gradient_clipping=0.5"],
    )
    plain = recipe.to_dict()
    assert (
        json.loads(json.dumps(plain)) == plain
    )  # JSON-safe: fits checkpoints and TensorBoard hparams
    assert Recipe.from_dict(plain) == recipe
    again = load_recipe(write_recipe(tmp_path, yaml.safe_dump(plain), name="saved.yaml"))
    assert again == recipe
    assert list(plain)[:6] == ["run_name", "output_dir", "cache_dir", "device", "seed", "teacher"]


def test_a_recipe_without_a_teacher_trains_on_ce_alone(tmp_path):
    """No `teacher:` section: accepted for a CE-only run of a student made from student.path;
    anything that needs a teacher names the field and the way out."""
    alone = {"data": MINIMAL["data"], "loss": {"divergence": "none"},
             "student": {"init": "config", "path": "models/student"}}  # fmt: skip
    assert load_recipe(write_recipe(tmp_path, alone)).teacher is None
    for change, message in [
        ({"loss": {"divergence": "tad"}}, "teacher: required for loss.divergence tad"),
        ({"student": {"init": "derived"}}, "teacher: required for student.init derived"),
    ]:
        with pytest.raises(RecipeError, match=message):
            load_recipe(write_recipe(tmp_path, {**alone, **change}))
