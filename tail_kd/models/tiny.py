"""A tiny teacher and tokenizer made offline in seconds, for tests and smoke runs.

`build_tiny_pair` trains a SentencePiece BPE tokenizer on a small public-domain corpus shipped with
the package (`tail_kd/assets/tiny_corpus.txt`), wraps it as a Hugging Face Llama tokenizer with a
pad token and a chat template, and saves a randomly initialised 4-layer Llama beside it. The result
is cached: the folder name hashes everything that determines it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import sentencepiece as spm
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer, PreTrainedTokenizerBase

from tail_kd.models.cache import build_once

DEFAULT_CORPUS = Path(__file__).resolve().parent.parent / "assets" / "tiny_corpus.txt"

TEACHER_DIMS = dict(
    num_hidden_layers=4,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)

# Role markers are single tokens; every turn ends with the eos token, then a newline.
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def build_tiny_pair(
    out_dir: str | Path,
    corpus_path: str | Path = DEFAULT_CORPUS,
    vocab_size: int = 512,
    seed: int = 0,
) -> tuple[str, str]:
    """Build (or reuse) a tiny teacher and its tokenizer under `out_dir`; return both folders.

    Returns `(teacher_dir, tokenizer_dir)`: a Hugging Face model folder (config, safetensors and
    tokenizer) and a tokenizer-only folder. Both live in `out_dir/tiny-<hash>/`, published
    atomically; the hash covers the corpus bytes, `vocab_size`, `seed` and `TEACHER_DIMS`.
    """
    corpus_path = Path(corpus_path)
    if not corpus_path.is_file():
        raise FileNotFoundError(f"tiny corpus {corpus_path} does not exist")
    recipe = {
        "corpus_sha256": hashlib.sha256(corpus_path.read_bytes()).hexdigest(),
        "vocab_size": vocab_size,
        "seed": seed,
        "teacher": TEACHER_DIMS,
    }
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]

    def build(tmp: Path) -> None:
        tokenizer = train_tokenizer(corpus_path, tmp / "tokenizer", vocab_size)
        save_random_teacher(tokenizer, tmp / "teacher", seed)

    root = build_once(Path(out_dir) / f"tiny-{key}", build)
    return str(root / "teacher"), str(root / "tokenizer")


def train_tokenizer(corpus_path: Path, out_dir: Path, vocab_size: int) -> PreTrainedTokenizerBase:
    """Train a byte-fallback SentencePiece BPE on `corpus_path`; save it to `out_dir` as HF Llama.

    Ids 0-3 are `<unk> <s> </s> <pad>`; digits are always single tokens (maths data), role markers
    too, and byte fallback makes any text encodable. Returns the Hugging Face tokenizer.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        input=str(corpus_path),
        model_prefix=str(out_dir / "tokenizer"),
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        user_defined_symbols=[str(d) for d in range(10)] + ROLE_TOKENS,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        num_threads=1,
        minloglevel=2,
    )
    (out_dir / "tokenizer.vocab").unlink()
    tokenizer = LlamaTokenizer.from_pretrained(out_dir, pad_token="<pad>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def save_random_teacher(tokenizer: PreTrainedTokenizerBase, out_dir: Path, seed: int) -> None:
    """Save a random `TEACHER_DIMS` Llama sized for `tokenizer`, and the tokenizer, to `out_dir`."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TEACHER_DIMS,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
