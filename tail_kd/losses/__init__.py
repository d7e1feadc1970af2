"""The TAD loss core: math only (no DeepSpeed, no transformers).

- `dense`: per-token divergences on full logits, the readable reference.
- `fused`: the chunked, optionally vocab-parallel loss from hidden states and lm_head weights.
- `vocab_parallel`: per-token reductions across vocabulary shards.
"""

from .dense import forward_kl, reverse_kl, tad_divergence, teacher_top_k_mask
from .fused import DIVERGENCES, IGNORE_INDEX, TADLossOutput, fused_tad_loss

__all__ = [
    "tad_divergence",
    "forward_kl",
    "reverse_kl",
    "teacher_top_k_mask",
    "fused_tad_loss",
    "TADLossOutput",
    "DIVERGENCES",
    "IGNORE_INDEX",
]
