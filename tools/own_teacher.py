"""The study's own teacher: a corpus, a tokenizer, a Llama pretrained here by `tail-kd train`.

A real pretrained teacher with a 49k vocabulary cannot be distilled to convergence on two CPU
cores (about 60 tokens/s). This set-up can: a small Llama with a small vocabulary, pretrained by
this project on public-domain English prose (tools/corpora.py), then distilled into smaller,
narrower students that train for long enough that their held-out CE flattens.

`prepare(work, size, log)` does each step once (each is reused by later calls):

    corpus      tools/corpora.py: whole documents, every 10th held out   work/corpus/
    tokenizer   byte-fallback SentencePiece BPE on the training text       work/tokenizer/
                (`tail_kd.models.tiny.train_tokenizer`)
    configs     the teacher's and the student's Llama configs, each with   work/teacher-config/
                the tokenizer (a model folder without weights)             work/student-config/
    teacher     pretrained on CE alone, without a teacher of its own       work/teacher-run/
                (recipes/study/pretrain-teacher.yaml; resumable)
    export      its final checkpoint as a Hugging Face folder              work/teacher/

and returns the `--set` values that point recipes/study/own-teacher.yaml at them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from corpora import build_corpus

REPO = Path(__file__).resolve().parent.parent
PRETRAIN_RECIPE = REPO / "recipes" / "study" / "pretrain-teacher.yaml"


@dataclass(frozen=True)
class Size:
    """The corpus, the vocabulary, both models' shapes and the teacher's pretraining."""

    corpora: tuple[str, ...]
    vocab_size: int
    seq_len: int
    teacher: dict  # LlamaConfig fields
    student: dict
    pretrain: tuple[str, ...]  # `--set` values for the teacher's pretraining


SIZES = {
    # About 13 MB of text (3.6M tokens); a 5.8M-parameter teacher pretrained on 3.3M tokens
    # (about 20 minutes on 2 cores); students of 0.9M parameters (2 layers, half the width).
    "full": Size(
        corpora=("kjv", "austen", "shakespeare"),
        vocab_size=4096,
        seq_len=128,
        teacher=dict(
            num_hidden_layers=6,
            hidden_size=256,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=768,
        ),  # fmt: skip
        student=dict(
            num_hidden_layers=2,
            hidden_size=128,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=384,
        ),  # fmt: skip
        pretrain=("train.steps=800", "train.warmup_steps=40", "train.lr=3e-3"),
    ),
    # The CI smoke test: Genesis and Exodus, a 2-layer teacher, a few steps.
    "quick": Size(
        corpora=("tiny",),
        vocab_size=1024,
        seq_len=64,
        teacher=dict(
            num_hidden_layers=2,
            hidden_size=64,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=128,
        ),  # fmt: skip
        student=dict(
            num_hidden_layers=1,
            hidden_size=32,
            num_attention_heads=1,
            num_key_value_heads=1,
            intermediate_size=64,
        ),  # fmt: skip
        pretrain=(
            "train.steps=30",
            "train.warmup_steps=3",
            "train.lr=3e-3",
            "train.global_batch_size=16",
            "train.micro_batch_size=16",
            "data.eval_examples=16",
        ),  # fmt: skip
    ),
}


@dataclass(frozen=True)
class Prepared:
    """Where `prepare` put things."""

    teacher: Path  # the exported teacher (a Hugging Face folder)
    student_config: Path
    train_data: Path  # folder of training documents
    held_out: Path  # folder of held-out documents (the study's evaluation data)
    corpus: dict  # the corpus manifest

    def overrides(self) -> list[str]:
        """The `--set` values that point recipes/study/own-teacher.yaml at the prepared files."""
        return [
            f"teacher.path={json.dumps(str(self.teacher))}",
            f"student.path={json.dumps(str(self.student_config))}",
            f"data.source={json.dumps(str(self.train_data))}",
        ]


def prepare(work: Path, size: Size, log) -> Prepared:
    """Corpus, tokenizer, configs, the pretrained and exported teacher (module docstring)."""
    from tail_kd.models.cache import build_once
    from tail_kd.models.tiny import train_tokenizer
    from tail_kd.run_dir import run_status

    corpus = build_corpus(work / "corpus", list(size.corpora))
    train_dir, held_out = work / "corpus" / "train", work / "corpus" / "held_out"
    log(f"corpus: {corpus['chars']['train']} characters to train on, "
        f"{corpus['chars']['held_out']} held out ({len(corpus['documents'])} documents)")  # fmt: skip

    def tokenizer_from_corpus(folder: Path) -> None:
        text = folder / "training-text.txt"
        text.write_text("".join(p.read_text() for p in sorted(train_dir.glob("*.txt"))))
        train_tokenizer(text, folder, size.vocab_size)
        text.unlink()

    tokenizer_dir = build_once(work / f"tokenizer-{size.vocab_size}", tokenizer_from_corpus)
    teacher_config = _model_folder(work / "teacher-config", tokenizer_dir, size.teacher, size)
    student_config = _model_folder(work / "student-config", tokenizer_dir, size.student, size)

    run_dir, teacher = work / "teacher-run", work / "teacher"
    if run_status(run_dir).state != "finished":
        command = [
            sys.executable, "-m", "tail_kd.cli", "train", str(PRETRAIN_RECIPE), "--nproc", "1",
            "--output-dir", str(run_dir), "--resume",
            "--set", f"cache_dir={json.dumps(str(work / '.cache'))}",
            "--set", f"student.path={json.dumps(str(teacher_config))}",
            "--set", f"data.source={json.dumps(str(train_dir))}",
            "--set", f"data.seq_len={size.seq_len}",
        ]  # fmt: skip
        for value in size.pretrain:
            command += ["--set", value]
        log(f"pretrain the teacher: {' '.join(command[2:])}")
        _run_logged(command, run_dir / "train.log")
        if run_status(run_dir).state != "finished":
            raise SystemExit(f"pretraining the teacher failed: see {run_dir}/train.log")
    if not (teacher / "config.json").is_file():
        _run_logged(
            [sys.executable, "-m", "tail_kd.cli", "export", str(run_dir), str(teacher)],
            work / "export.log",
        )
    return Prepared(teacher, student_config, train_dir, held_out, corpus)


def _model_folder(folder: Path, tokenizer_dir: Path, dims: dict, size: Size) -> Path:
    """A Llama config of `dims` sized for the tokenizer, with the tokenizer, in `folder` (once)."""
    from transformers import AutoTokenizer, LlamaConfig

    from tail_kd.models.cache import build_once

    def build(out: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            max_position_embeddings=size.seq_len,
            tie_word_embeddings=True,
            **dims,
        )
        config.save_pretrained(out)
        tokenizer.save_pretrained(out)

    return build_once(folder, build)


def _run_logged(command: list[str], log_path: Path) -> None:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as out:
        subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, check=False)
