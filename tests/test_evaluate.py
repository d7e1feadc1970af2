"""tail_kd.eval: metric definitions against independent references, answer extraction, and an end
to end `tail-kd eval` (+ lm-evaluation-harness) of a tiny student exported from a real run.

References: ECE and Full-ECE against plain NumPy loops written from the papers' formulas and a
hand-computed case; CE/perplexity against torch's cross_entropy; KL against torch's kl_div; the
end-to-end CE against the Hugging Face model's own loss on the same held-out set.
"""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tail_kd.eval.maths import extract_answer, is_correct, normalize_number
from tail_kd.eval.metrics import CalibrationBins, TokenMetrics, bin_index, score_hidden_states
from tail_kd.monitor import EVAL_SCALARS, read_scalars

REPO = Path(__file__).resolve().parent.parent
TINY_RECIPE = REPO / "recipes" / "tiny" / "tad.yaml"


# ---------------------------------------------------------------------------------------------
# Plain NumPy references, written from the definitions (one prediction at a time, bins by masks)
# ---------------------------------------------------------------------------------------------


def numpy_bins(num_bins):
    """Guo et al.'s equal-width bins ((m-1)/M, m/M], the first one closed at 0."""
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    return [(edges[m], edges[m + 1], m == 0) for m in range(num_bins)]


def numpy_binned_error(probs, outcomes, normalizer, num_bins):
    """sum_m |B_m| / normalizer * |mean outcome in B_m - mean prob in B_m|."""
    total = 0.0
    for low, high, first in numpy_bins(num_bins):
        inside = (probs > low) & (probs <= high)
        if first:
            inside |= probs == 0.0
        if inside.any():
            gap = abs(outcomes[inside].mean() - probs[inside].mean())
            total += inside.sum() / normalizer * gap
    return total


def numpy_ece(probs, targets, num_bins=15):
    """Top-1 ECE (Guo et al. 2017): confidence = max prob, outcome = argmax is the target."""
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == targets).astype(np.float64)
    return numpy_binned_error(confidence, correct, len(targets), num_bins)


def numpy_full_ece(probs, targets, num_bins=15):
    """Full-ECE (Liu et al. 2024): every probability of every position is a prediction whose
    outcome is 'this token is the target'; weights |B*_m| / N with N the number of positions."""
    outcomes = np.zeros_like(probs)
    outcomes[np.arange(len(targets)), targets] = 1.0
    return numpy_binned_error(probs.ravel(), outcomes.ravel(), len(targets), num_bins)


def numpy_softmax(logits):
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def test_hand_computed_case():
    """Two positions, V = 3, M = 5 bins (0, .2], (.2, .4], (.4, .6], (.6, .8], (.8, 1]:
        q1 = [0.50, 0.35, 0.15], y1 = 0     q2 = [0.10, 0.65, 0.25], y2 = 2
    CE   = (-log 0.5 - log 0.25) / 2;  top-1 accuracy = 1/2 (position 1 right, 2 wrong)
    ECE  = 1/2 |1 - 0.50| + 1/2 |0 - 0.65| = 0.575        (bins 3 and 4, one prediction each)
    Full-ECE, per bin |sum outcomes - sum probs| / N:
        bin 1: 0.15, 0.10 (no hit)      |0 - 0.25| = 0.25
        bin 2: 0.35, 0.25 (0.25 hit)    |1 - 0.60| = 0.40
        bin 3: 0.50 (hit)               |1 - 0.50| = 0.50
        bin 4: 0.65 (no hit)            |0 - 0.65| = 0.65      -> (0.25+0.4+0.5+0.65) / 2 = 0.9
    """
    probs = torch.tensor([[0.50, 0.35, 0.15], [0.10, 0.65, 0.25]], dtype=torch.float64)
    targets = torch.tensor([0, 2])
    metrics = TokenMetrics(num_bins=5)
    metrics.update(probs.log(), targets, teacher_logits=probs.log())
    result = metrics.result()
    assert result["ce"] == pytest.approx((-math.log(0.5) - math.log(0.25)) / 2, rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(result["ce"]))
    assert result["top1_accuracy"] == 0.5
    assert result["ece"] == pytest.approx(0.575, abs=1e-6)
    assert result["full_ece"] == pytest.approx(0.9, abs=1e-6)
    assert result["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)  # the teacher is the student
    assert result["top1_agreement"] == 1.0
    diagram = metrics.diagrams()["full_ece"]
    assert diagram["count"] == [2, 2, 1, 1, 0]
    assert (
        diagram["frequency"][:4] == pytest.approx([0, 0.5, 1, 0])
        and diagram["frequency"][4] is None
    )


def test_bins_follow_guo_et_al():
    probs = torch.tensor([0.0, 1e-9, 0.2, 0.2000001, 0.5, 0.9999, 1.0], dtype=torch.float64)
    assert bin_index(probs, 5).tolist() == [0, 0, 0, 1, 2, 4, 4]


@pytest.mark.parametrize("num_bins", [15, 7])
@pytest.mark.parametrize("sharpness", [0.5, 3.0, 8.0])
def test_metrics_match_numpy_and_torch_references(num_bins, sharpness):
    generator = torch.Generator().manual_seed(int(sharpness * 10) + num_bins)
    n, vocab = 300, 50
    student = torch.randn(n, vocab, generator=generator, dtype=torch.float64) * sharpness
    teacher = torch.randn(n, vocab, generator=generator, dtype=torch.float64) * sharpness
    targets = torch.randint(0, vocab, (n,), generator=generator)
    targets[::7] = -100  # ignored positions
    metrics = TokenMetrics(num_bins)
    for start in range(0, n, 64):  # in chunks, as the scorer feeds it
        stop = start + 64
        metrics.update(student[start:stop], targets[start:stop], teacher[start:stop])
    result = metrics.result()

    keep = targets != -100
    s, t, y = student[keep], teacher[keep], targets[keep]
    q = numpy_softmax(s.numpy())
    assert result["positions"] == keep.sum()
    assert result["ce"] == pytest.approx(F.cross_entropy(student, targets).item(), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(F.cross_entropy(s, y).item()), rel=1e-5)
    kl = F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="batchmean")
    assert result["kl_to_teacher"] == pytest.approx(kl.item(), rel=1e-5)
    assert result["top1_accuracy"] == pytest.approx((s.argmax(-1) == y).double().mean().item())
    assert result["top1_agreement"] == pytest.approx(
        (s.argmax(-1) == t.argmax(-1)).double().mean().item()
    )
    assert result["ece"] == pytest.approx(numpy_ece(q, y.numpy(), num_bins), rel=1e-4, abs=1e-7)
    assert result["full_ece"] == pytest.approx(
        numpy_full_ece(q, y.numpy(), num_bins), rel=1e-4, abs=1e-7
    )


def test_kl_with_zero_teacher_probabilities():
    """0 log 0 = 0: tokens the teacher rules out (probability exactly 0) add nothing."""
    teacher = torch.tensor([[0.0, math.log(0.5), math.log(0.5), -math.inf]])
    student = torch.tensor([[0.0, 0.0, 0.0, 0.0]])  # uniform over 4
    metrics = TokenMetrics()
    metrics.update(student, torch.tensor([1]), teacher)
    p = [0.5, 0.25, 0.25, 0.0]  # softmax of the teacher logits: exp = 1, 0.5, 0.5, 0
    expected = 0.5 * math.log(0.5 / 0.25)  # the 0.25 terms are log 1 = 0, the last 0 log 0 = 0
    assert expected == pytest.approx(sum(pi * math.log(pi / 0.25) for pi in p if pi > 0))
    assert metrics.result()["kl_to_teacher"] == pytest.approx(expected, rel=1e-5)


def test_state_sums_like_one_pass():
    """Ranks can add their states (one all-reduce): the sum equals scoring everything at once."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 9, generator=generator)
    teacher = torch.randn(40, 9, generator=generator)
    targets = torch.randint(0, 9, (40,), generator=generator)
    whole, first, second = TokenMetrics(), TokenMetrics(), TokenMetrics()
    whole.update(logits, targets, teacher)
    first.update(logits[:15], targets[:15], teacher[:15])
    second.update(logits[15:], targets[15:], teacher[15:])
    merged = TokenMetrics()
    merged.load_state(first.state() + second.state())
    for name, value in whole.result().items():
        assert merged.result()[name] == pytest.approx(value, rel=1e-9), name


def test_perfectly_calibrated_predictions_have_small_errors():
    """Targets drawn from the predicted distributions themselves: both errors shrink to ~0."""
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(20000, 6, generator=generator) * 2
    targets = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)
    metrics = TokenMetrics()
    metrics.update(logits, targets)
    assert metrics.result()["ece"] < 0.02
    assert metrics.result()["full_ece"] < 0.03
    bins = CalibrationBins(4)
    bins.add(torch.tensor([0.9, 0.9]), hits=torch.tensor([0.0, 0.0]))  # confidently wrong
    assert bins.error(2) == pytest.approx(0.9)


def test_score_hidden_states_equals_dense_logits():
    """Chunked logits from hidden states and heads, with padded rows and -100 labels, score the
    same as full logits of the shifted positions."""
    generator = torch.Generator().manual_seed(2)
    batch, length, hidden, vocab, padded = 3, 11, 8, 20, 24
    s_hidden = torch.randn(batch, length, hidden, generator=generator)
    t_hidden = torch.randn(batch, length, hidden, generator=generator)
    s_weight = torch.randn(padded, hidden, generator=generator)
    t_weight = torch.randn(padded, hidden, generator=generator)
    labels = torch.randint(0, vocab, (batch, length), generator=generator)
    labels[0, :4] = -100  # a prompt
    labels[2, 7:] = -100  # padding
    chunked = TokenMetrics()
    score_hidden_states(
        chunked, s_hidden, lambda h: h @ s_weight.T, labels, t_hidden, lambda h: h @ t_weight.T,
        vocab_size=vocab, chunk_size=5,
    )  # fmt: skip
    dense = TokenMetrics()
    dense.update(
        (s_hidden[:, :-1] @ s_weight[:vocab].T).reshape(-1, vocab),
        labels[:, 1:].reshape(-1),
        (t_hidden[:, :-1] @ t_weight[:vocab].T).reshape(-1, vocab),
    )
    assert chunked.result() == pytest.approx(dense.result(), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Answer extraction
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("So he makes 6750*$0.25=$1687.5 every week\n#### 1687.5", "1687.5"),
        ("#### 1,234", "1234"),
        ("The answer is\n####   -7\n", "-7"),
        ("#### $18.00.", "18"),
        ("#### 5\nQuestion: next... #### 9", "5"),  # the first marked answer
        ("She has 3 apples and buys 4, so 7 in total.", "7"),  # no ####: the last number
        ("Total: 1,000,000 dollars", "1000000"),
        ("It is 0.50 now", "0.5"),
        ("#### 0.0", "0"),
        ("no digits here", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_normalize_and_match():
    assert normalize_number("$1,687.50") == "1687.5"
    assert normalize_number("100") == "100"  # not 1E+2
    assert normalize_number("abc") is None
    assert is_correct("... #### 100", "work\n#### 100.0")
    assert is_correct("so the answer is 42", "#### 42")
    assert not is_correct("#### 41", "#### 42")
    assert not is_correct("I do not know", "#### 42")


def test_strict_extraction_accepts_marked_answers_only():
    degenerate = "1111 1 11 1 1  1"  # the flexible fallback credits this for the answer 1
    assert is_correct(degenerate, "#### 1") and not is_correct(degenerate, "#### 1", strict=True)
    assert extract_answer("so it is 7", strict=True) is None
    assert extract_answer("so it is 7\n#### 7", strict=True) == "7"
    assert is_correct("#### 1,000", "#### 1000", strict=True)


def test_lm_eval_task_scoring_uses_the_same_extraction():
    from tail_kd.lm_eval_tasks.gsm_symbolic.utils import process_results

    doc = {"question": "q", "answer": "work\n#### 1,200"}
    assert process_results(doc, ["so... #### 1200\n"]) == {"exact_match": 1}
    assert process_results(doc, ["it is 1200.00 apples"]) == {"exact_match": 1}
    assert process_results(doc, ["#### 12"]) == {"exact_match": 0}


# ---------------------------------------------------------------------------------------------
# End to end: a tiny run (1 CPU rank, 2 steps), `tail-kd eval` on it and on its export, lm_eval
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A finished 2-step tiny run on 2 ranks whose final in-training evaluation covers the whole
    held-out set (8 sequences = 2 micro-batches of 2 on each rank), and its exported student."""
    from tail_kd.export import export
    from tail_kd.models import build_tiny_pair
    from tail_kd.run_dir import read_done

    root = tmp_path_factory.mktemp("evaluate")
    run_dir, cache = root / "run", root / "cache"
    sets = ["train.steps=2", "train.warmup_steps=1", "checkpoint.every=0", "eval.every=0",
            "eval.max_batches=2", f"cache_dir={cache}", "eval.tasks=[tail_kd_gsm_symbolic_chat]",
            "eval.tasks_limit=2"]  # fmt: skip
    command = [
        sys.executable,
        "-m",
        "tail_kd.cli",
        "train",
        "--nproc",
        "2",
        str(TINY_RECIPE),
        "--output-dir",
        str(run_dir),
    ]
    for value in sets:
        command += ["--set", value]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TAIL_KD_CACHE": str(cache),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert read_done(run_dir) is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    exported = export(run_dir, root / "student")
    teacher_dir = build_tiny_pair(cache / "tiny")[0]  # built by the run: found in the cache
    return {
        "root": root,
        "run": run_dir,
        "cache": cache,
        "student": exported,
        "teacher": teacher_dir,
        "proc": proc,
    }


def test_eval_of_a_run_matches_the_model_loss_the_trainer_and_its_export(tiny, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tail_kd.eval.command import main
    from tail_kd.eval.evaluate import REPORTED, load_eval_data

    report_path = tiny["root"] / "run-report.json"
    tensorboard = tiny["root"] / "tb"
    status = main([str(tiny["run"]), "--teacher", str(tiny["teacher"]), "--out", str(report_path),
                   "--tensorboard", str(tensorboard), "--gsm", "3", "--max-new-tokens", "6",
                   "--chunk-size", "50", "--cache-dir", str(tiny["cache"])])  # fmt: skip
    assert status == 0, capsys.readouterr().err
    report = json.loads(report_path.read_text())
    metrics = report["metrics"]
    assert report["step"] == 2 and report["data"]["sequences"] == 8

    # Independent references on the same 8 held-out sequences: the Hugging Face model's own loss,
    # and KL from full logits with torch's kl_div.
    student = AutoModelForCausalLM.from_pretrained(tiny["student"])
    teacher = AutoModelForCausalLM.from_pretrained(tiny["teacher"])
    tokenizer = AutoTokenizer.from_pretrained(tiny["student"])
    run_recipe = json.loads(
        next((tiny["run"] / "checkpoints").glob("step-*/trainer_state.json")).read_text()
    )["recipe"]
    items = load_eval_data(None, tokenizer, run_recipe=run_recipe).items
    batch = {key: torch.stack([items[i][key] for i in range(len(items))]) for key in items[0]}
    with torch.no_grad():
        out = student(**batch)
        t_logits = teacher(input_ids=batch["input_ids"]).logits[:, :-1].flatten(0, 1)
    s_logits = out.logits[:, :-1].flatten(0, 1)
    kl = F.kl_div(
        s_logits.log_softmax(-1), t_logits.log_softmax(-1), log_target=True, reduction="batchmean"
    )
    assert report["data"]["positions"] == batch["input_ids"][:, 1:].numel()
    assert metrics["ce"] == pytest.approx(out.loss.item(), rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(out.loss.item()), rel=1e-5)
    assert metrics["kl_to_teacher"] == pytest.approx(kl.item(), rel=1e-4)
    q = numpy_softmax(s_logits.double().numpy())
    y = batch["labels"][:, 1:].flatten().numpy()
    assert metrics["ece"] == pytest.approx(numpy_ece(q, y), rel=1e-3, abs=1e-6)
    assert metrics["full_ece"] == pytest.approx(numpy_full_ece(q, y), rel=1e-3, abs=1e-6)
    assert report["gsm"]["problems"] == 3 and len(report["gsm"]["details"]) == 3
    assert metrics["gsm_accuracy"] == sum(d["correct"] for d in report["gsm"]["details"]) / 3
    assert metrics["gsm_strict_accuracy"] <= metrics["gsm_accuracy"]

    # The trainer's final held-out metrics (ZeRO-3 shards over 2 ranks, each rank scoring its
    # part, states summed) on the same 8 sequences.
    logged = read_scalars(tiny["run"] / "tensorboard" / "tiny-tad")
    for name in EVAL_SCALARS:
        assert logged[f"eval/{name}"][-1] == (2, pytest.approx(metrics[name], rel=1e-4)), name

    # TensorBoard scalars, read back with TensorBoard's reader.
    scalars = read_scalars(tensorboard)
    assert sorted(scalars) == sorted(f"eval/{name}" for name in REPORTED)
    assert scalars["eval/ce"] == [(2, pytest.approx(metrics["ce"]))]

    # The exported folder scores the same (the run's data named by its recipe).
    recipe_file = tiny["root"] / "recipe.json.yaml"  # JSON is YAML
    recipe_file.write_text(json.dumps(run_recipe))
    exported_path = tiny["root"] / "export-report.json"
    assert (
        main([str(tiny["student"]), "--data", str(recipe_file), "--out", str(exported_path)]) == 0
    )
    exported = json.loads(exported_path.read_text())["metrics"]
    for name in ("ce", "top1_accuracy", "ece", "full_ece"):
        assert exported[name] == pytest.approx(metrics[name], rel=1e-6), name


def test_eval_of_data_files_and_input_errors(tiny, capsys):
    from transformers import AutoTokenizer

    from tail_kd.data.sft import tokenize_example
    from tail_kd.eval.command import main

    records = [{"question": "How many days are in a week?", "answer": "Seven.\n#### 7"},
               {"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}]  # fmt: skip
    qa = tiny["root"] / "qa.jsonl"
    qa.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tiny["root"] / "qa-report.json"
    assert (
        main([str(tiny["student"]), "--data", str(qa), "--out", str(out), "--seq-len", "64"]) == 0
    )
    report = json.loads(out.read_text())
    tokenizer = AutoTokenizer.from_pretrained(tiny["student"])
    answer_tokens = sum(
        len(tokenize_example(r["question"], r["answer"], tokenizer)[1]) for r in records
    )
    assert report["data"]["kind"] == "sft" and report["data"]["positions"] == answer_tokens
    assert math.isnan(report["metrics"]["kl_to_teacher"])  # no teacher given

    text = tiny["root"] / "text.txt"
    text.write_text("In the beginning God created the heaven and the earth. " * 40)
    out = tiny["root"] / "text-report.json"
    assert main([str(tiny["student"]), "--data", str(text), "--out", str(out), "--seq-len", "32",
                 "--max-examples", "3"]) == 0  # fmt: skip
    report = json.loads(out.read_text())
    assert report["data"]["kind"] == "pretrain" and report["data"]["positions"] == 3 * 31

    capsys.readouterr()
    assert main([str(tiny["student"])]) == 2
    assert "pass --data" in capsys.readouterr().err


def test_lm_eval_harness_runs_the_shipped_task_on_the_exported_student(tiny):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval)")
    from transformers import AutoTokenizer

    from tail_kd.eval.maths import prompt_for
    from tail_kd.lm_eval_tasks import TASKS_DIR

    output = tiny["root"] / "lm_eval"
    env = {**os.environ, "TAIL_KD_CACHE": str(tiny["root"] / "lm_cache"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}  # fmt: skip
    command = [
        sys.executable, "-m", "lm_eval", "--model", "hf",
        "--model_args", f"pretrained={tiny['student']},dtype=float32", "--device", "cpu",
        "--tasks", "tail_kd_gsm_symbolic_chat", "--include_path", TASKS_DIR,
        "--apply_chat_template", "--limit", "4", "--gen_kwargs", "max_gen_toks=8",
        "--metadata", json.dumps({"num_examples": 6, "train_examples": 50}),
        "--output_path", str(output), "--log_samples",
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (results_file,) = output.glob("*/results_*.json")
    results = json.loads(results_file.read_text())["results"]["tail_kd_gsm_symbolic_chat"]
    assert results["sample_len"] == 4 and "exact_match,none" in results
    (samples_file,) = output.glob("*/samples_tail_kd_gsm_symbolic_chat_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(tiny["student"])
    for sample in samples:  # the prompt of supervised training, scored by our exact match
        assert sample["arguments"]["gen_args_0"]["arg_0"] == prompt_for(
            sample["doc"]["question"], tokenizer
        )
        assert sample["exact_match"] == is_correct(sample["resps"][0][0], sample["doc"]["answer"])
    generated = sorted(p.name for p in (tiny["root"] / "lm_cache" / "lm_eval").iterdir())
    assert len(generated) == 2 and all(name.endswith(".jsonl") for name in generated)


def test_printed_metrics_show_their_size():
    """A Full-ECE of 1.4e-10 is printed as such, not as 0.0000 (four significant digits)."""
    from tail_kd.eval.evaluate import format_report
    from tail_kd.monitor import format_metrics

    metrics = {"ce": 2.901234, "full_ece": 1.4e-10, "top1_accuracy": 0.5}
    report = {"model": "m", "step": 3, "data": {"sequences": 2, "positions": 9}, "metrics": metrics}
    assert (
        format_report(report).splitlines()[1] == "ce 2.901 | top1_accuracy 0.5 | full_ece 1.4e-10"
    )
    assert (
        format_metrics({**metrics, "lr": 1e-4})
        == "ce 2.901 | top1 0.5 | full_ece 1.4e-10 | lr 1.00e-04"
    )


# ---------------------------------------------------------------------------------------------
# Few-shot benchmarks through lm-evaluation-harness (tail_kd/eval/harness.py)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ending_task(tmp_path_factory) -> Path:
    """A local multiple-choice task (no hub): the true second half of a KJV verse among four."""
    import random

    folder = tmp_path_factory.mktemp("tasks")
    corpus = (REPO / "tail_kd" / "assets" / "tiny_corpus.txt").read_text().splitlines()
    verses = [v.split() for v in corpus if len(v.split()) > 8][:120]
    rng = random.Random(0)
    rows = []
    for words in verses[:30]:
        cut = len(words) // 2
        others = [" ".join(o[len(o) // 2 :]) for o in rng.sample(verses[30:], 3)]
        label = rng.randrange(4)
        choices = others[:label] + [" ".join(words[cut:])] + others[label:]
        rows.append({"context": " ".join(words[:cut]), "choices": choices, "label": label})
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = [{"text": " ".join(words)} for words in verses[30:]]  # held-out text for Full-ECE
    (folder / "text.jsonl").write_text("".join(json.dumps(t) + "\n" for t in texts))
    (folder / "kjv_ending.yaml").write_text(
        textwrap.dedent(f"""\
        task: kjv_ending
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {folder / "test.jsonl"}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{context}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: "{{{{label}}}}"
        metric_list:
          - metric: acc
          - metric: acc_norm
        metadata:
          version: 1.0
    """)
    )
    return folder


def _choice_accuracy(model_dir: Path, rows: list[dict]) -> tuple[float, float]:
    """(acc, acc_norm) computed here: the summed log-probability of each choice after its
    context (lm-eval's " " between them), argmax; acc_norm divides by the choice's bytes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    acc = acc_norm = 0
    for row in rows:
        scores = []
        for choice in row["choices"]:
            context = tokenizer.encode(row["context"], add_special_tokens=False)
            whole = tokenizer.encode(row["context"] + " " + choice, add_special_tokens=False)
            with torch.no_grad():
                logp = model(torch.tensor([whole])).logits[0].log_softmax(-1)
            total = sum(logp[i - 1, whole[i]].item() for i in range(len(context), len(whole)))
            scores.append((total, total / len((" " + choice).encode())))
        acc += max(range(len(scores)), key=lambda i: scores[i][0]) == row["label"]
        acc_norm += max(range(len(scores)), key=lambda i: scores[i][1]) == row["label"]
    return acc / len(rows), acc_norm / len(rows)


def test_benchmarks_score_like_a_direct_log_likelihood_comparison(tiny, ending_task, capsys):
    """`tail-kd eval --tasks` on a local multiple-choice task: the accuracy lm-eval reports is
    the one computed here from the model's own log-probabilities, and it reaches the JSON report
    and TensorBoard (eval/tasks/<task>, eval/tasks/average)."""
    from tail_kd.eval.command import main

    out, tensorboard = tiny["root"] / "tasks.json", tiny["root"] / "tasks-tb"
    status = main([str(tiny["student"]), "--data", str(ending_task / "text.jsonl"), "--tasks",
                   "kjv_ending", "--task-path", str(ending_task), "--limit", "20", "--out",
                   str(out), "--tensorboard", str(tensorboard)])  # fmt: skip
    assert status == 0, capsys.readouterr().err
    benchmarks = json.loads(out.read_text())["benchmarks"]
    task = benchmarks["tasks"]["kjv_ending"]
    rows = [json.loads(line) for line in (ending_task / "test.jsonl").read_text().splitlines()]
    acc, acc_norm = _choice_accuracy(tiny["student"], rows[:20])
    assert (task["acc,none"], task["acc_norm,none"]) == (acc, acc_norm)
    assert task["metric"] == "acc_norm" and benchmarks["average_accuracy"] == acc_norm
    scalars = read_scalars(tensorboard)
    assert scalars["eval/tasks/kjv_ending"] == [(0, pytest.approx(acc_norm))]
    assert "accuracy: kjv_ending" in capsys.readouterr().out


def test_an_unknown_task_is_named_before_the_model_loads(tiny, capsys):
    from tail_kd.eval.command import main

    assert main([str(tiny["run"]), "--tasks", "arc_easy,no_such_task"]) == 2
    assert "lm-eval knows no task no_such_task" in capsys.readouterr().err


def test_a_run_whose_recipe_names_tasks_is_benchmarked_when_it_finishes(tiny):
    """The fixture's `tail-kd train --nproc 2` ran `tail-kd eval RUN --final`: the recipe's task
    (the shipped maths one, 2 problems) in RUN/final_eval.json and in the run's TensorBoard at
    its last step."""
    report = json.loads((tiny["run"] / "final_eval.json").read_text())
    task = report["benchmarks"]["tasks"]["tail_kd_gsm_symbolic_chat"]
    assert task["metric"] == "exact_match" and task["samples"] == 2
    (tb_run,) = (tiny["run"] / "tensorboard").iterdir()
    scalars = read_scalars(tb_run)
    assert [step for step, _ in scalars["eval/tasks/tail_kd_gsm_symbolic_chat"]] == [2]
    assert f"report: {tiny['run'] / 'final_eval.json'}" in tiny["proc"].stdout
