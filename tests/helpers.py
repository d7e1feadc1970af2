"""Helpers shared by test modules: loss inputs, a run launched as a user would, TensorBoard."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import torch

from tail_kd.losses import IGNORE_INDEX
from tail_kd.monitor import read_scalars
from tail_kd.run_dir import read_done

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "tiny" / "tad.yaml"
RUN_NAME = "tiny-tad"
# Rarely (about 1 run in 27 here) a gloo rank aborts at interpreter exit after a complete run, which
# makes the launcher return non-zero: tests check a run's own completion marker as well as its
# exit status.
EXIT_ABORT = "terminate called without an active exception"


# ---------------------------------------------------------------------------------------------
# Loss inputs
# ---------------------------------------------------------------------------------------------


def make_batch(batch=3, length=11, hs=16, ht=24, rows=37, seed=0, dtype=torch.float64, scale=1.0):
    """(student hidden, student lm_head, teacher hidden, teacher lm_head, labels) with a masked
    prompt in sequence 0 and padding at the end of sequence 1."""
    g = torch.Generator().manual_seed(seed)
    s_hidden = torch.randn(batch, length, hs, generator=g, dtype=dtype)
    t_hidden = torch.randn(batch, length, ht, generator=g, dtype=dtype)
    s_weight = torch.randn(rows, hs, generator=g, dtype=dtype) * scale
    t_weight = torch.randn(rows, ht, generator=g, dtype=dtype) * scale
    labels = torch.randint(0, rows, (batch, length), generator=g)
    labels[0, :4] = IGNORE_INDEX  # a masked prompt
    labels[1, -3:] = IGNORE_INDEX  # padding
    return s_hidden, s_weight, t_hidden, t_weight, labels


def loss_and_grads(fn, s_hidden, s_weight, *rest, **kwargs):
    """(loss, grad of the student hidden states, grad of the student lm_head) of one loss call;
    `fn` returns a `DistillationLossOutput` or a scalar tensor."""
    s_hidden = s_hidden.detach().clone().requires_grad_(True)
    s_weight = s_weight.detach().clone().requires_grad_(True)
    out = fn(s_hidden, s_weight, *rest, **kwargs)
    loss = out if torch.is_tensor(out) else out.loss
    loss.backward()
    return loss.detach(), s_hidden.grad, s_weight.grad


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """A finished training process and its output directory."""

    dir: Path
    proc: subprocess.CompletedProcess

    @property
    def output(self) -> str:
        return f"--- stdout\n{self.proc.stdout[-6000:]}\n--- stderr\n{self.proc.stderr[-6000:]}"

    def scalars(self, run_name: str = RUN_NAME) -> dict[str, list[tuple[int, float]]]:
        """TensorBoard scalars read back with TensorBoard's own reader: tag -> [(step, value)]."""
        return read_scalars(self.dir / "tensorboard" / run_name)

    def assert_finished(self, step: int) -> None:
        """The run's own DONE marker, and a clean exit (or the known abort at interpreter exit)."""
        done = read_done(self.dir)
        assert done is not None and done["step"] == step, self.output
        assert self.proc.returncode == 0 or EXIT_ABORT in self.proc.stderr, self.output

    def exited_with(self, status: int) -> bool:
        """`status`, or the rare abort at interpreter exit after the work was done."""
        return self.proc.returncode == status or EXIT_ABORT in self.proc.stderr


# ---------------------------------------------------------------------------------------------
# Tiny random models of several families, built offline from transformers' config classes
# ---------------------------------------------------------------------------------------------

# family -> (config class name, family-specific settings): a logit post-processing where the
# family has one, large enough that getting it wrong shows (logits of about +-20).
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "gemma2": ("Gemma2Config", {"final_logit_softcapping": 10.0, "head_dim": 8}),
    "phi3": ("Phi3Config", {"pad_token_id": 0}),
    "cohere": ("CohereConfig", {"logit_scale": 0.25, "eos_token_id": 2}),
    "granite": ("GraniteConfig", {"logits_scaling": 4.0}),
}


def tiny_family_config(family: str, vocab_size: int = 64):
    """A 2-layer, 32-wide config of `family`."""
    import transformers

    class_name, extra = FAMILIES[family]
    return getattr(transformers, class_name)(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.5,
        **extra,
    )


def tiny_family_model(family: str, seed: int, vocab_size: int = 64):
    """A random model of `tiny_family_config(family)`, float32, in eval mode, its lm_head scaled
    up so that its logits reach about +-20."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_family_config(family, vocab_size)).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model
