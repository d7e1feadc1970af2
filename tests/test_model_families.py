"""Each model family the project supports, as tiny random models of Llama, Qwen2, Gemma-2 (logit
soft-capping), Phi-3 (fused qkv_proj), Cohere (logit scale) and Granite (logit scaling), built
offline from transformers' config classes: the loss against each family's own logits, derived
students that keep the teacher's heads, and the whole path (train, export, reload, generate)."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from helpers import FAMILIES, RECIPE, REPO, Run, tiny_family_config, tiny_family_model
from tail_kd.exit_status import UsageError
from tail_kd.losses import (
    IGNORE_INDEX,
    dense_distillation_loss,
    fused_distillation_loss,
    tad_divergence,
)
from tail_kd.models import check_logits_reproduced, head_logits, logit_transform

LOSS = dict(divergence="tad", k=5, beta=2.0, normalize=True, ce_weight=1.0)


def _batch(vocab_size=64):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (2, 12), generator=g)
    labels = ids.clone()
    labels[0, :3] = IGNORE_INDEX
    return ids, labels


def _loss_from_logits(s_logits, t_logits, labels):
    """CE + TAD from full logits (the models' own), mean over valid positions."""
    s_logits, t_logits, labels = s_logits[:, :-1], t_logits[:, :-1], labels[:, 1:]
    mask = labels != IGNORE_INDEX
    ce = F.cross_entropy(s_logits.flatten(0, 1), labels.flatten(), reduction="none")
    tad = tad_divergence(s_logits, t_logits, mask, k=5, beta=2.0, normalize=True)
    return torch.where(mask, ce.view_as(mask) + tad, 0.0).sum() / mask.sum()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_loss_reproduces_each_familys_own_logits(family):
    teacher, student = tiny_family_model(family, seed=0), tiny_family_model(family, seed=1)
    ids, labels = _batch()
    with torch.no_grad():
        t_logits = teacher(input_ids=ids).logits.double()
        s_logits = student(input_ids=ids).logits.double()
        t_hidden = teacher.base_model(input_ids=ids).last_hidden_state.double()
        s_hidden = student.base_model(input_ids=ids).last_hidden_state.double()
    assert t_logits.abs().max() > 5  # large enough for a missed post-processing to show
    check_logits_reproduced(teacher, "teacher")
    torch.testing.assert_close(head_logits(student, s_hidden.float()), s_logits.float())

    inputs = (
        s_hidden[:, :-1].clone().requires_grad_(),
        student.lm_head.weight.detach().double().clone().requires_grad_(),
        t_hidden[:, :-1],
        teacher.lm_head.weight.detach().double(),
        labels[:, 1:],
    )
    transforms = dict(
        student_transform=logit_transform(student.config),
        teacher_transform=logit_transform(teacher.config),
    )
    fused = fused_distillation_loss(*inputs, chunk_size=5, **LOSS, **transforms)
    expected = _loss_from_logits(s_logits, t_logits, labels)
    torch.testing.assert_close(fused.loss, expected, rtol=1e-6, atol=1e-6)
    # Gradients: the fused loss's hand-made ones against autograd through the same transforms.
    dense = dense_distillation_loss(*inputs, **LOSS, **transforms)
    ours = torch.autograd.grad(fused.loss, inputs[:2])
    reference = torch.autograd.grad(dense.loss, inputs[:2])
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    if not logit_transform(teacher.config).is_identity:  # the transform is what makes it right
        plain = fused_distillation_loss(*inputs, chunk_size=5, **LOSS)
        assert abs(float(plain.loss.detach()) - float(expected)) > 1e-2


def test_a_family_with_unknown_logit_post_processing_is_refused():
    class DoublesItsLogits(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    model = DoublesItsLogits(tiny_family_model("llama", seed=0).config).eval()
    with pytest.raises(UsageError, match="the teacher .DoublesItsLogits. computes its logits"):
        check_logits_reproduced(model, "teacher")


# ---------------------------------------------------------------------------------------------
# Derived students: every family's attention is sliced by heads, whatever its layout
# ---------------------------------------------------------------------------------------------


def _qkv(model, layer: int) -> dict[str, torch.Tensor]:
    """Layer `layer`'s query, key and value weights, [heads, head_dim, hidden] each: read from the
    separate projections, or split from Phi-3's fused one as Phi3Attention splits its output
    (query rows, then key rows, then value rows)."""
    config, attention = model.config, model.model.layers[layer].self_attn
    head_dim = config.hidden_size // config.num_attention_heads
    heads = {"q": config.num_attention_heads, "k": config.num_key_value_heads,
             "v": config.num_key_value_heads}  # fmt: skip
    if hasattr(attention, "qkv_proj"):
        rows = [heads[p] * head_dim for p in "qkv"]
        weights = dict(zip("qkv", attention.qkv_proj.weight.split(rows), strict=True))
    else:
        weights = {p: getattr(attention, f"{p}_proj").weight for p in "qkv"}
    return {p: w.view(heads[p], head_dim, -1) for p, w in weights.items()}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_derived_student_keeps_the_teachers_first_heads(family):
    """Half the width (2 of 4 query heads, 1 of 2 key/value heads) and one layer: each of the
    student's heads is the teacher's head of that number, on the student's input features; in
    Phi-3's fused projection too (taking its leading rows would give the student query heads as
    keys and values)."""
    from tail_kd.models import build_derived_student

    teacher = tiny_family_model(family, seed=0)
    student = build_derived_student(teacher, num_layers=1, hidden_size=16)
    t_heads, s_heads = _qkv(teacher, 0), _qkv(student, 0)
    for part in "qkv":
        heads, _, width = s_heads[part].shape
        torch.testing.assert_close(s_heads[part], t_heads[part][:heads, :, :width], msg=part)
    embed = teacher.get_input_embeddings().weight
    torch.testing.assert_close(student.get_input_embeddings().weight, embed[:, :16])


def test_attention_layouts_a_student_cannot_be_sliced_from_are_refused():
    """GPT-NeoX interleaves query, key and value per head in one `query_key_value`: refused by
    name, not silently sliced."""
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    from tail_kd.models import build_derived_student

    config = GPTNeoXConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4)  # fmt: skip
    teacher = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match=r"gpt_neox teacher: its parameters of .*query_key_value"):
        build_derived_student(teacher, num_layers=1)


@pytest.fixture(scope="module")
def tiny_tokenizer_dir(tmp_path_factory) -> str:
    from tail_kd.models import build_tiny_pair

    return build_tiny_pair(tmp_path_factory.mktemp("tiny"))[1]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_derives_trains_exports_and_generates(family, tiny_tokenizer_dir, tmp_path):
    """The whole path for a teacher of each family: the tiny recipe with this teacher (its logit
    post-processing checked against the loss), a derived student of half its width and one
    layer, 2 steps on one rank, `tail-kd export`, reload with transformers, generate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    config = tiny_family_config(family, vocab_size=len(tokenizer))
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    teacher = tmp_path / "teacher"
    AutoModelForCausalLM.from_config(config).save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    run_dir, out = tmp_path / "run", tmp_path / "student"
    sets = [f"teacher.path={teacher}", f"cache_dir={tmp_path / 'cache'}", "student.num_layers=1",
            "student.hidden_size=16", "train.steps=2", "train.warmup_steps=1",
            "train.global_batch_size=2", "train.micro_batch_size=2", "eval.every=0",
            "data.eval_examples=2"]  # fmt: skip
    command = [sys.executable, "-m", "tail_kd.train", str(RECIPE), "--output-dir", str(run_dir)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(command + [a for s in sets for a in ("--set", s)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    run = Run(run_dir, proc)
    run.assert_finished(2)
    export = subprocess.run([sys.executable, "-m", "tail_kd.cli", "export", str(run_dir), str(out)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert export.returncode == 0, export.stderr[-3000:]
    student = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(student).__name__ == type(AutoModelForCausalLM.from_config(config)).__name__
    assert (student.config.num_hidden_layers, student.config.hidden_size) == (1, 16)
    prompt = AutoTokenizer.from_pretrained(out)("In the beginning", return_tensors="pt")
    generated = student.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 5
