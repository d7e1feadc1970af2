"""Data: sources, packing, supervised masking, the cache, the loader and tools/prepare_data.py.

Everything runs offline with a small byte-level BPE tokenizer trained here in milliseconds.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, PreTrainedTokenizerFast

from tail_kd import prepare
from tail_kd.config import DataConfig, load_recipe
from tail_kd.data import pretrain, sft
from tail_kd.data.loader import DistillationLoader
from tail_kd.data.prepared import build_datasets, prepare_datasets
from tail_kd.data.sources import DataError, FileSource, GsmSymbolicSource, HubSource, open_source
from tail_kd.models.loading import load_tokenizer

REPO = Path(__file__).resolve().parent.parent
EOS = "<|endoftext|>"
CORPUS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Alice bought 12 apples and 7 oranges at the market, then gave 3 apples to Bob.",
    "How many apples does Alice have left? She has 12 - 3 = 9 apples.",
    "A train leaves the station at 9 o'clock and travels 60 miles per hour for 2 hours.",
    "Question: what is the total? Answer: the total is 120 miles.\n#### 120",
    "In the beginning the numbers 0 1 2 3 4 5 6 7 8 9 were written on the board.",
]
DOCUMENTS = [
    "Once upon a time a fox lived near the river. " * 8,
    "Alice counted her apples: 12, then 9, then 4. " * 5,
    "",  # empty documents are skipped, not packed as a lone EOS
    "The train travelled 120 miles in 2 hours, so its speed was 60 miles per hour. " * 6,
    "Short note.",
]


def make_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A GPT-2-like byte-level BPE tokenizer (every string round-trips) trained on CORPUS."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS)
    tokenizer.chat_template = chat_template
    return tokenizer


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}" + EOS + "\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def text_dir(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    for index, text in enumerate(DOCUMENTS):
        (folder / f"doc{index}.txt").write_text(text)
    (folder / "README.md").write_text("not data: ignored")
    return folder


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def qa_rows(count: int) -> list[dict]:
    return [
        {
            "question": f"Alice has {i} apples and buys 3 more. How many?",
            "answer": f"{i} + 3 = {i + 3}\n#### {i + 3}",
        }
        for i in range(count)
    ]


def tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --- sources ------------------------------------------------------------------------------------


def test_sources_read_txt_jsonl_and_parquet_in_order(tmp_path, text_dir):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')  # blank line skipped
    pq.write_table(pa.table({"text": ["three", "four"]}), tmp_path / "b.parquet")
    data = DataConfig(
        source=[str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet"), str(text_dir)]
    )
    records = list(open_source(data, seed=0).records())
    texts = [r.fields["text"] for r in records]
    assert texts == ["one", "two", "three", "four", *DOCUMENTS]
    assert records[1].origin.endswith("a.jsonl:3")
    capped = DataConfig(source=str(tmp_path / "a.jsonl"), num_examples=1)
    assert len(list(open_source(capped, seed=0).records())) == 1


def test_source_kinds_are_told_apart_without_reading(tmp_path):
    assert isinstance(open_source(DataConfig(source="openai/gsm8k"), 0), HubSource)
    generated = open_source(DataConfig(source="gsm_symbolic", kind="sft", num_examples=3), 0)
    assert isinstance(generated, GsmSymbolicSource)
    (tmp_path / "x.txt").write_text("x")
    assert isinstance(open_source(DataConfig(source=str(tmp_path / "x.txt")), 0), FileSource)


@pytest.mark.parametrize(
    "name, message",
    [
        ("missing.jsonl", "missing.jsonl: no such file or directory"),
        ("empty", "empty: directory has no .txt, .jsonl, .parquet files"),
        ("table.csv", "unsupported file type '.csv'; expected one of .txt, .jsonl, .parquet"),
    ],
)
def test_bad_sources_are_named(tmp_path, name, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "table.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=message):
        open_source(DataConfig(source=str(tmp_path / name)), seed=0)


def test_bad_records_are_named(tmp_path):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        list(open_source(DataConfig(source=str(bad_json)), 0).records())


def test_gsm_symbolic_generates_worked_solutions_offline():
    records = list(GsmSymbolicSource(size=4, seed=1).records())
    assert len(records) == 4
    for record in records:
        answer = record.fields["answer"]
        assert record.fields["question"].strip()
        assert answer.rsplit("\n", 1)[-1].startswith("#### ")
        float(answer.rsplit("#### ", 1)[1])  # the final answer is a number
    assert [r.fields for r in GsmSymbolicSource(size=4, seed=1).records()] == [
        r.fields for r in records
    ]


# --- packing ------------------------------------------------------------------------------------


def test_pack_cuts_the_eos_joined_stream_and_drops_the_tail():
    assert list(pretrain.pack([[1, 2, 3], [4], [5, 6, 7, 8, 9]], eos_token_id=0, seq_len=3)) == [
        [1, 2, 3],
        [0, 4, 0],
        [5, 6, 7],
        [8, 9, 0],
    ]
    assert list(pretrain.pack([[1]], eos_token_id=0, seq_len=3)) == []


def test_packed_sequences_are_the_tokenised_documents_joined_by_eos(tmp_path, text_dir, tokenizer):
    data = DataConfig(source=str(text_dir), seq_len=16, eval_examples=3)
    prepared = prepare_datasets(data, tokenizer, tmp_path / "cache", seed=0)
    expected = []
    for text in DOCUMENTS:  # file order doc0..doc4 is the sorted order
        if text:
            expected += tokens(tokenizer, text) + [tokenizer.eos_token_id]
    rows = [prepared.train[i] for i in range(len(prepared.train))]
    rows += [prepared.eval[i] for i in range(len(prepared.eval))]
    stream = torch.cat([row["input_ids"] for row in rows]).tolist()
    assert len(stream) == len(expected) // 16 * 16
    assert stream == expected[: len(stream)]
    assert len(prepared.eval) == 3
    for row in rows[:2]:
        assert row["input_ids"].dtype == torch.int64
        assert torch.equal(row["labels"], row["input_ids"])
        assert row["attention_mask"].tolist() == [1] * 16
    assert prepared.summary["documents"] == 4
    assert prepared.summary["dropped_tail_tokens"] == len(expected) - len(stream)


def test_too_little_text_is_an_error(tmp_path, tokenizer):
    source = write_jsonl(tmp_path / "tiny.jsonl", [{"text": "Short note."}])
    with pytest.raises(DataError, match=r"do not fill one sequence of data.seq_len=64"):
        build_datasets(DataConfig(source=str(source), seq_len=64), tokenizer, tmp_path / "c", 0)
    assert not any((tmp_path / "c").glob("pretrain-*/"))  # nothing half-built is left behind
    with pytest.raises(DataError, match=r"data.eval_examples=64 would leave none for training"):
        build_datasets(DataConfig(source=str(source), seq_len=2), tokenizer, tmp_path / "c", 0)


def test_missing_field_names_record_field_and_setting(tmp_path, tokenizer):
    source = write_jsonl(tmp_path / "d.jsonl", [{"content": "hello"}])
    with pytest.raises(DataError) as error:
        build_datasets(DataConfig(source=str(source)), tokenizer, tmp_path / "c", 0)
    message = str(error.value)
    assert "d.jsonl:1: record has no field 'text' (it has: content); set data.text_field" in message
    data = DataConfig(source=str(source), kind="sft")
    with pytest.raises(DataError, match="no field 'question'.*set data.question_field"):
        build_datasets(data, tokenizer, tmp_path / "c", 0)


# --- the cache ----------------------------------------------------------------------------------


def count_builds(monkeypatch, module):
    """Wrap `module.build` so that the test can see how often the cache was (re)built."""
    calls = []
    real_build = module.build

    def build(*args, **kwargs):
        calls.append(1)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(module, "build", build)
    return calls


def test_second_run_reuses_the_cache(tmp_path, text_dir, tokenizer, monkeypatch):
    builds = count_builds(monkeypatch, pretrain)
    data = DataConfig(source=str(text_dir), seq_len=16, eval_examples=2)
    first = prepare_datasets(data, tokenizer, tmp_path / "cache", seed=0)
    second = prepare_datasets(data, tokenizer, tmp_path / "cache", seed=0)
    assert len(builds) == 1 and second.cache_path == first.cache_path
    assert second.train[5]["input_ids"].tolist() == first.train[5]["input_ids"].tolist()
    # A reloaded copy of the same tokenizer and a different eval split reuse the same table ...
    prepare_datasets(
        DataConfig(source=str(text_dir), seq_len=16, eval_examples=5),
        make_tokenizer(),
        tmp_path / "cache",
        seed=0,
    )
    assert len(builds) == 1
    # ... while a changed source file, seq_len or chat template make a new entry.
    (text_dir / "doc4.txt").write_text("Short note, edited.")
    changed = prepare_datasets(data, tokenizer, tmp_path / "cache", seed=0)
    assert len(builds) == 2 and changed.cache_path != first.cache_path
    prepare_datasets(DataConfig(source=str(text_dir), seq_len=8), tokenizer, tmp_path / "cache", 0)
    prepare_datasets(data, make_tokenizer(CHAT_TEMPLATE), tmp_path / "cache", seed=0)
    assert len(builds) == 4


@pytest.mark.parametrize("damage", ["truncate", "overwrite", "delete", "manifest"])
def test_damaged_cache_is_detected_and_rebuilt(
    tmp_path, text_dir, tokenizer, monkeypatch, damage, caplog
):
    builds = count_builds(monkeypatch, pretrain)
    data = DataConfig(source=str(text_dir), seq_len=16, eval_examples=2)
    first = prepare_datasets(data, tokenizer, tmp_path / "cache", seed=0)
    expected = [first.train[i]["input_ids"].tolist() for i in range(len(first.train))]
    table = first.cache_path / "sequences.arrow"
    if damage == "truncate":
        table.write_bytes(table.read_bytes()[:-100])
    elif damage == "overwrite":
        raw = bytearray(table.read_bytes())
        raw[-50:-40] = b"\x01" * 10
        table.write_bytes(bytes(raw))
    elif damage == "delete":
        table.unlink()
    else:
        (first.cache_path / "manifest.json").write_text("{not json")
    with caplog.at_level(logging.WARNING):
        again = prepare_datasets(data, tokenizer, tmp_path / "cache", seed=0)
    assert len(builds) == 2
    assert "is damaged" in caplog.text and "rebuilding" in caplog.text
    assert [again.train[i]["input_ids"].tolist() for i in range(len(again.train))] == expected


def test_killed_build_never_looks_complete(tmp_path, text_dir, tokenizer, monkeypatch):
    real_build = pretrain.build

    def killed(source, data, tokenizer, out_dir):
        real_build(source, data, tokenizer, out_dir)  # the table is fully written ...
        raise KeyboardInterrupt  # ... but the process dies before the entry is published

    monkeypatch.setattr(pretrain, "build", killed)
    data = DataConfig(source=str(text_dir), seq_len=16, eval_examples=2)
    with pytest.raises(KeyboardInterrupt):
        prepare_datasets(data, tokenizer, tmp_path / "cache", seed=0)
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.setattr(pretrain, "build", real_build)
    entry = prepare_datasets(data, tokenizer, tmp_path / "cache", seed=0).cache_path
    # SIGKILL leaves a temporary folder: it is never loaded, and the next build removes it.
    shutil.rmtree(entry)
    stale = entry.with_name(f".{entry.name}.tmp-999999")
    stale.mkdir()
    (stale / "sequences.arrow").write_bytes(b"partial")
    builds = count_builds(monkeypatch, pretrain)
    prepare_datasets(data, tokenizer, tmp_path / "cache", seed=0)
    assert len(builds) == 1 and entry.is_dir() and not stale.exists()


# --- supervised examples ------------------------------------------------------------------------


@pytest.mark.parametrize("template", [None, CHAT_TEMPLATE], ids=["plain", "chat-template"])
def test_sft_labels_mask_prompt_and_padding(tmp_path, template):
    tokenizer = make_tokenizer(template)
    source = write_jsonl(tmp_path / "qa.jsonl", qa_rows(6))
    data = DataConfig(source=str(source), kind="sft", seq_len=96, eval_examples=2)
    train, held = build_datasets(data, tokenizer, tmp_path / "cache", seed=0)
    assert (len(train), len(held)) == (4, 2)
    rows = qa_rows(6)
    for index, example in enumerate([train[i] for i in range(4)] + [held[i] for i in range(2)]):
        question, answer = rows[index]["question"], rows[index]["answer"]
        prompt, completion = sft.render(question, answer, tokenizer)
        n_prompt = len(tokens(tokenizer, prompt))
        n_real = int(example["attention_mask"].sum())
        labels, ids = example["labels"], example["input_ids"]
        assert example["attention_mask"].tolist() == [1] * n_real + [0] * (96 - n_real)
        assert (labels[:n_prompt] == -100).all() and (labels[n_real:] == -100).all()
        assert torch.equal(labels[n_prompt:n_real], ids[n_prompt:n_real])
        assert tokenizer.decode(ids[:n_prompt]) == prompt
        assert question in prompt
        decoded_answer = tokenizer.decode(labels[n_prompt:n_real])
        assert decoded_answer == completion
        assert decoded_answer.startswith(answer) and decoded_answer.rstrip().endswith(EOS)
        if template:
            assert prompt.endswith("<|assistant|>\n")
        else:
            assert prompt == f"Question: {question}\nAnswer: "


def test_sft_truncates_long_answers_and_drops_answerless_records(tmp_path, tokenizer, caplog):
    rows = qa_rows(4)
    rows[1]["answer"] = "9 + 3 = 12. " * 40 + "\n#### 12"  # too long: cut
    rows[2]["question"] = "How many apples? " * 40  # prompt alone fills seq_len: dropped
    source = write_jsonl(tmp_path / "qa.jsonl", rows)
    data = DataConfig(source=str(source), kind="sft", seq_len=64, eval_examples=0)
    with caplog.at_level(logging.WARNING):
        prepared = prepare_datasets(data, tokenizer, tmp_path / "cache", seed=0)
    assert prepared.eval is None and len(prepared.train) == 3
    counts = prepared.summary["train"]
    assert (counts["examples"], counts["truncated"], counts["dropped"]) == (3, 1, 1)
    assert "dropped 1 of 4 records whose prompt alone fills data.seq_len=64" in caplog.text
    assert "cut the end off 1 of 4 answers" in caplog.text
    cut = prepared.train[1]
    assert cut["attention_mask"].all() and cut["labels"][-1] != -100


def test_gsm_symbolic_sft_eval_is_generated_separately(tmp_path, tokenizer):
    data = DataConfig(
        source="gsm_symbolic", kind="sft", num_examples=12, eval_examples=4, seq_len=1024
    )
    prepared = prepare_datasets(data, tokenizer, tmp_path / "cache", seed=3)
    assert len(prepared.train) == 12 and 1 <= len(prepared.eval) <= 4

    def prompts(dataset):
        rows = [dataset[i] for i in range(len(dataset))]
        return {
            tokenizer.decode(r["input_ids"][(r["labels"] == -100) & (r["attention_mask"] == 1)])
            for r in rows
        }

    assert not prompts(prepared.train) & prompts(prepared.eval)
    answer = tokenizer.decode(prepared.train[0]["labels"][prepared.train[0]["labels"] != -100])
    assert "#### " in answer and answer.endswith(EOS)


# --- the loader ---------------------------------------------------------------------------------


def numbered(count: int, length: int = 3) -> list[dict[str, torch.Tensor]]:
    """Examples whose input_ids all equal their index."""
    return [
        {"input_ids": torch.full((length,), i), "labels": torch.full((length,), i)}
        for i in range(count)
    ]


def indices(batch) -> list[int]:
    return batch["input_ids"][:, 0].tolist()


def test_loader_batches_have_the_contract_shape():
    batch = next(DistillationLoader(numbered(10), micro_batch_size=4, rank=0, world_size=1, seed=0))
    assert batch["input_ids"].shape == (4, 3) and set(batch) == {"input_ids", "labels"}


def test_ranks_are_disjoint_and_cover_each_epoch():
    dataset, micro, world = numbered(23), 2, 3  # 23 // 6 = 3 steps per epoch, 5 examples skipped
    loaders = [DistillationLoader(dataset, micro, rank, world, seed=7) for rank in range(world)]
    assert loaders[0].batches_per_epoch == 3
    for epoch in range(2):
        seen = [sum((indices(next(loader)) for _ in range(3)), []) for loader in loaders]
        flat = sum(seen, [])
        assert len(flat) == len(set(flat)) == 18  # disjoint, no repeats within the epoch
        order = torch.randperm(23, generator=torch.Generator().manual_seed(7 + epoch)).tolist()
        assert set(flat) == set(order[:18])  # exactly the epoch's full steps
    # Ranks agree on the order: rank r's batch k is slice r of global step k.
    fresh = [DistillationLoader(dataset, micro, rank, world, seed=7) for rank in range(world)]
    order = torch.randperm(23, generator=torch.Generator().manual_seed(7)).tolist()
    assert sum((indices(next(loader)) for loader in fresh), []) == order[:6]


def test_resume_continues_with_exactly_the_next_batches():
    dataset = numbered(10)
    loader = DistillationLoader(dataset, micro_batch_size=3, rank=0, world_size=1, seed=1)
    for _ in range(4):  # past the end of epoch 0 (3 batches per epoch)
        next(loader)
    state = json.loads(json.dumps(loader.state_dict()))  # survives a checkpoint file
    expected = [indices(next(loader)) for _ in range(7)]
    resumed = DistillationLoader(dataset, micro_batch_size=3, rank=0, world_size=1, seed=1)
    resumed.load_state_dict(state)
    assert [indices(next(resumed)) for _ in range(7)] == expected
    assert state["epoch"] == 1


def test_resume_with_another_world_size_keeps_the_global_order():
    dataset = numbered(24)
    single = DistillationLoader(dataset, micro_batch_size=2, rank=0, world_size=1, seed=0)
    for _ in range(4):  # 8 examples
        next(single)
    state = single.state_dict()
    rest_single = sum((indices(next(single)) for _ in range(4)), [])
    pair = [DistillationLoader(dataset, 2, rank, 2, seed=0) for rank in range(2)]
    for loader in pair:
        loader.load_state_dict(state)
    rest_pair = []
    for _ in range(2):
        for loader in pair:
            rest_pair += indices(next(loader))
    assert rest_pair == rest_single


def test_loader_rejects_bad_arguments_and_foreign_state():
    with pytest.raises(
        ValueError, match="fewer than one step of micro_batch_size 4 x world size 2"
    ):
        DistillationLoader(numbered(5), micro_batch_size=4, rank=0, world_size=2, seed=0)
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        DistillationLoader(numbered(5), micro_batch_size=1, rank=2, world_size=2, seed=0)
    state = DistillationLoader(numbered(5), 1, 0, 1, seed=0).state_dict()
    with pytest.raises(ValueError, match="the data order would differ"):
        DistillationLoader(numbered(6), 1, 0, 1, seed=0).load_state_dict(state)


def test_loader_reads_cached_datasets(tmp_path, text_dir, tokenizer):
    data = DataConfig(source=str(text_dir), seq_len=16, eval_examples=2)
    train, _ = build_datasets(data, tokenizer, tmp_path / "cache", seed=0)
    batch = next(DistillationLoader(train, micro_batch_size=2, rank=0, world_size=1, seed=0))
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        k: ((2, 16), torch.int64) for k in ("input_ids", "labels", "attention_mask")
    }


# --- tools/prepare_data.py ----------------------------------------------------------------------


def test_prepare_data_script_builds_the_cache_the_job_will_find(tmp_path, text_dir):
    model_dir = tmp_path / "teacher"
    make_tokenizer().save_pretrained(model_dir)
    LlamaConfig(
        vocab_size=400,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    ).save_pretrained(model_dir)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "run_name": "prep",
                "output_dir": str(tmp_path / "runs" / "prep"),
                "teacher": {"path": str(model_dir)},
                "data": {"source": str(text_dir), "seq_len": 64, "eval_examples": 1},
            }
        )
    )
    env = {**os.environ, "TAIL_KD_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "prepare_data.py"), str(recipe)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    cache_dir = tmp_path / "cache" / "data"
    (entry,) = [p for p in cache_dir.iterdir() if p.is_dir()]
    assert f"cache: {entry}" in done.stdout
    assert "eval : 1 sequences x 64 tokens = 64 tokens" in done.stdout
    # The training job, loading the same tokenizer from the folder, finds that very entry.
    loaded = load_recipe(recipe, [f"cache_dir={tmp_path / 'cache'}"])
    prepared = prepare_datasets(loaded.data, load_tokenizer(model_dir), loaded.data.cache_dir, 0)
    assert prepared.cache_path == entry


def test_prepare_data_reports_errors_without_a_traceback(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"teacher": {"path": "t"}, "data": {"source": "d.txt"}}))
    assert prepare.main([str(recipe), "--set", "data.seq_len=1"]) == 2
    assert "data.seq_len: expected an integer >= 2, got 1" in capsys.readouterr().err


def _write_recipe(path: Path, teacher: str, source: Path, cache: Path) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "teacher": {"path": teacher},
                "data": {"source": str(source), "seq_len": 64, "eval_examples": 1},
                "cache_dir": str(cache),
            }
        )
    )
    return path


def test_prepare_data_check_reports_what_a_job_would_build(tmp_path, text_dir, capsys):
    """--check builds nothing and says what is missing (exit 1); after prepare-data all is
    ready (exit 0): the Slurm scripts then run the job offline."""
    recipe = _write_recipe(tmp_path / "r.yaml", "tiny://", text_dir, tmp_path / "cache")
    assert prepare.main([str(recipe), "--check"]) == 1
    out = capsys.readouterr().out
    assert "data     MISSING" in out and "not ready: run `tail-kd prepare-data" in out
    assert not (tmp_path / "cache" / "data").exists()
    assert prepare.main([str(recipe)]) == 0
    capsys.readouterr()
    assert prepare.main([str(recipe), "--check"]) == 0
    out = capsys.readouterr().out
    assert "teacher  ready" in out and "data     ready" in out


def test_prepare_data_check_of_a_hub_teacher_needs_no_network(
    tmp_path, text_dir, capsys, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a download attempt would fail loudly
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty Hugging Face cache
    recipe = _write_recipe(tmp_path / "r.yaml", "example-org/model", text_dir, tmp_path / "cache")
    assert prepare.main([str(recipe), "--check"]) == 1
    out = capsys.readouterr().out
    assert "teacher  MISSING hub model example-org/model (with weights)" in out
    assert "data     MISSING needs the teacher's tokenizer" in out


def test_prepare_data_check_of_a_gguf_teacher_converts_nothing(tmp_path, text_dir, capsys):
    gguf = tmp_path / "teacher.gguf"
    gguf.write_bytes(b"GGUF" + b"\x00" * 60)  # unreadable: converting it would fail
    recipe = _write_recipe(tmp_path / "r.yaml", str(gguf), text_dir, tmp_path / "cache")
    assert prepare.main([str(recipe), "--check"]) == 1
    assert f"teacher  MISSING {gguf} converted into {tmp_path / 'cache' / 'gguf'}" in (
        capsys.readouterr().out
    )


def test_prepare_data_refuses_an_unknown_benchmark_before_building_anything(
    tmp_path, text_dir, capsys
):
    recipe = _write_recipe(tmp_path / "r.yaml", "tiny://", text_dir, tmp_path / "cache")
    assert prepare.main([str(recipe), "--set", "eval.tasks=[arc_easy, arc_eazy]"]) == 2
    err = capsys.readouterr().err
    assert "eval.tasks: lm-eval knows no task arc_eazy" in err and "eval.task_paths" in err
    assert not (tmp_path / "cache").exists()


def test_prepare_data_fetches_benchmarks_and_check_finds_what_is_missing(
    tmp_path, text_dir, capsys, monkeypatch
):
    """The shipped maths task (local data) is fetched and then ready; arc_easy's data are not in
    the (empty) datasets cache, and --check says so without going to the hub."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TAIL_KD_CACHE", str(tmp_path / "tail_kd"))
    recipe = _write_recipe(tmp_path / "r.yaml", "tiny://", text_dir, tmp_path / "cache")
    maths = ["--set", "eval.tasks=[tail_kd_gsm_symbolic_chat]"]
    assert prepare.main([str(recipe), *maths]) == 0
    capsys.readouterr()
    assert prepare.main([str(recipe), *maths, "--check"]) == 0
    assert "tasks    ready   benchmark data of tail_kd_gsm_symbolic_chat" in capsys.readouterr().out
    arc = ["--set", "eval.tasks=[tail_kd_gsm_symbolic_chat, arc_easy]"]
    assert prepare.main([str(recipe), *arc, "--check"]) == 1
    assert "tasks    MISSING benchmark data of tail_kd_gsm_symbolic_chat, arc_easy" in (
        capsys.readouterr().out
    )
