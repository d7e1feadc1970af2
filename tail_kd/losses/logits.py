"""What a model does to its lm_head's output before the softmax: a scale, then a soft cap.

Most decoder families use the lm_head's output z as logits. Some post-process it:

    scale     z -> a z                  Cohere (`logit_scale`), Granite (1 / `logits_scaling`),
                                        Falcon-H1 (`lm_head_multiplier`)
    soft cap  z -> c tanh(z / c)        Gemma-2 and Gemma-3 (`final_logit_softcapping`)

Both are element-wise, so the fused loss applies them to each chunk's logits on each vocabulary
slice, and multiplies the logit gradient by their derivative,

    d/dz [c tanh(a z / c)] = a (1 - tanh^2(a z / c)) = a (1 - (logit / c)^2),

before turning it into gradients for the hidden states and the weight.
`tail_kd.models.logit_transform` reads the transform from a model's config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LogitTransform", "IDENTITY"]


@dataclass(frozen=True)
class LogitTransform:
    """logits = softcap * tanh(scale * z / softcap), or scale * z without a soft cap."""

    scale: float = 1.0
    softcap: float | None = None

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def __call__(self, z: Tensor) -> Tensor:
        """The logits of lm_head outputs `z` (same dtype)."""
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def derivative(self, logits: Tensor) -> Tensor:
        """d logits / d z, from the logits themselves (not from z)."""
        if self.softcap is None:
            return torch.full_like(logits, self.scale)
        return self.scale * (1.0 - (logits / self.softcap).square())


IDENTITY = LogitTransform()
