"""From a model's final hidden states to its logits, as the loss computes them, checked against
the model's own forward.

The loss (tail_kd/losses) takes the backbone's final hidden states and the lm_head weight, not
the model's logits, so whatever a family does between the two must be known here:
`logit_transform` reads it from the config (`tail_kd.losses.LogitTransform`: Cohere's
`logit_scale`, Granite's `logits_scaling`, Falcon-H1's `lm_head_multiplier`, Gemma-2/3's
`final_logit_softcapping`). `check_logits_reproduced` runs a few tokens through a model both ways
and refuses a model whose own logits come out different (a post-processing this list does not
know, a final norm outside the backbone), before any training starts.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig, PreTrainedModel

from tail_kd.exit_status import UsageError
from tail_kd.losses import LogitTransform

__all__ = ["logit_transform", "head_logits", "check_logits_reproduced"]


def logit_transform(config: PretrainedConfig) -> LogitTransform:
    """What the family of `config` does to its lm_head's output before the softmax."""
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None:  # Cohere, Cohere2
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:  # Granite, GraniteMoe
        scale /= float(config.logits_scaling)
    if getattr(config, "lm_head_multiplier", None) is not None:  # Falcon-H1
        scale *= float(config.lm_head_multiplier)
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma-2, Gemma-3
    return LogitTransform(scale=scale, softcap=None if softcap is None else float(softcap))


def head_logits(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """The logits the loss computes from `model`'s final hidden states: lm_head, then transform."""
    weight = model.get_output_embeddings().weight
    transform = logit_transform(model.config)
    z = hidden @ weight.T
    return z if transform.is_identity else transform(z.float()).to(z.dtype)


@torch.no_grad()
def check_logits_reproduced(model: PreTrainedModel, role: str, tokens: int = 8) -> None:
    """UsageError unless `model`'s logits on a few tokens equal what the loss computes from its
    backbone's final hidden states (to the precision of its dtype)."""
    device = model.get_output_embeddings().weight.device
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = torch.arange(tokens, device=device).remainder(vocab).unsqueeze(0)
    training = model.training
    model.eval()  # no dropout
    try:
        hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
        ours = head_logits(model, hidden).float()
        theirs = model(input_ids=ids, use_cache=False).logits.float()
    finally:
        model.train(training)
    tolerance = 1e-3 + (2e-2 if model.dtype in (torch.bfloat16, torch.float16) else 1e-4) * float(
        theirs.abs().max()
    )
    error = float((ours - theirs).abs().max())
    if ours.shape != theirs.shape or error > tolerance:
        raise UsageError(
            f"the {role} ({type(model).__name__}) computes its logits in a way tail-kd does not "
            f"reproduce from its final hidden states and lm_head (max difference {error:.3g}): "
            "its family post-processes logits beyond a scale or a soft cap "
            "(tail_kd/models/logits.py lists the ones known); it cannot be distilled here yet"
        )
