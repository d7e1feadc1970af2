"""Training data: sources -> tokenised, cached tables -> datasets -> a resumable loader.

- `sources`: records from files, a `datasets` name or the `gsm_symbolic` generator.
- `pretrain`: packed text (loss on every token); `sft`: question/answer (loss on the answer).
- `cache`: the fingerprinted, atomic, self-checking store every rank and later run reuses.
- `prepared`: a recipe's datasets, from the cache or built into it (`build_datasets`).
- `loader`: the deterministic, resumable, distributed `DistillationLoader`.

The datasets follow the data contract of docs/ARCHITECTURE.md: items are dicts of int64 tensors
`input_ids`, `labels` (-100 where no loss is taken) and `attention_mask`, all `seq_len` long.

This file imports nothing, so that `tail_kd.data.sources` (standard library only) can check a
recipe's data before `datasets` and torch are imported.
"""
