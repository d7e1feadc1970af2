"""Check that a teacher and a student can be distilled token for token.

Logit-level distillation compares the two next-token distributions id by id, so id i must mean the
same token in both models. Embedding matrices are often padded beyond the tokenizer (Qwen: 151936
rows for 151665 tokens), differently for models of one family; those rows are never real tokens.
The loss must therefore run over the shared real vocabulary only: `check_vocabularies` finds it.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


class VocabularyMismatchError(ValueError):
    """The teacher's and student's tokenizers disagree on what some token id means."""


def check_vocabularies(
    teacher_tokenizer: PreTrainedTokenizerBase,
    student_tokenizer: PreTrainedTokenizerBase,
    teacher_rows: int,
    student_rows: int,
) -> int:
    """Return `vocab_size`, the number of leading ids that are real tokens of both models.

    `teacher_rows`/`student_rows` are the rows of each model's output embedding (lm_head); rows past
    the tokenizer's length are padding. Accepted: the same vocabulary, or a student vocabulary that
    is a prefix of the teacher's (ids 0..n-1 map to the same tokens), whatever the padding. Anything
    else raises VocabularyMismatchError saying what differs.
    """
    teacher_size = _check_rows("teacher", teacher_tokenizer, teacher_rows)
    student_size = _check_rows("student", student_tokenizer, student_rows)
    if teacher_tokenizer is student_tokenizer:
        return teacher_size
    if student_size > teacher_size:
        raise VocabularyMismatchError(
            f"the student tokenizer has {student_size} tokens, more than the teacher's "
            f"{teacher_size}: the student's vocabulary must equal the teacher's or be a prefix "
            f"of it"
        )
    teacher_tokens = _tokens_by_id(teacher_tokenizer)
    student_tokens = _tokens_by_id(student_tokenizer)
    for token_id in range(student_size):
        if student_tokens.get(token_id) != teacher_tokens.get(token_id):
            raise VocabularyMismatchError(
                f"teacher ({teacher_size} tokens) and student ({student_size} tokens) vocabularies "
                f"differ first at id {token_id}: teacher {teacher_tokens.get(token_id)!r}, "
                f"student {student_tokens.get(token_id)!r}; distil with one tokenizer family, "
                f"or give the student the teacher's tokenizer"
            )
    return student_size


def _check_rows(role: str, tokenizer: PreTrainedTokenizerBase, rows: int) -> int:
    """len(tokenizer), after checking that every token id has a row in the model's embedding."""
    size = len(tokenizer)
    if rows < size:
        raise VocabularyMismatchError(
            f"the {role} tokenizer has {size} tokens but the {role} model only {rows} embedding "
            f"rows: the tokenizer does not belong to this model"
        )
    return size


def _tokens_by_id(tokenizer: PreTrainedTokenizerBase) -> dict[int, str]:
    return {token_id: token for token, token_id in tokenizer.get_vocab().items()}
