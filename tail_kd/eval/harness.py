"""Few-shot benchmarks through lm-evaluation-harness, as the paper reports them.

The paper reports the average accuracy of 8 few-shot tasks (and Full-ECE, which
tail_kd/eval/metrics.py computes on held-out text). It does not list them in what this project
has of it; `PAPER_TASKS` is the 8-task suite that small-LM pre-training and distillation papers
report most often (MiniPLM, the paper's own baseline, among them), all multiple choice scored by
log-likelihood, so that a student's number compares with theirs:

    arc_easy, arc_challenge   grade-school science questions            (acc_norm)
    hellaswag                 commonsense sentence endings              (acc_norm)
    piqa                      physical commonsense                      (acc_norm)
    winogrande                pronoun resolution                        (acc)
    boolq                     yes/no reading comprehension              (acc)
    openbookqa                science facts                             (acc_norm)
    lambada_openai            the last word of a passage                (acc)

`run_tasks` runs any lm-eval task names (these, the tasks shipped in tail_kd/lm_eval_tasks, or a
folder of your own definitions) on a loaded model and returns, per task, its accuracy (the
length-normalised `acc_norm` where the task has it, else `acc`, else `exact_match`) and their
mean.

The harness downloads each task's data from the hub into the Hugging Face datasets cache the first
time. `fetch_tasks` does that ahead: `tail-kd prepare-data` (on a login node, for compute nodes
without network) and the start of training call it for a recipe's `eval.tasks`, so a task name
that does not exist or data that cannot be fetched stop the run before it trains, not after.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

from tail_kd.exit_status import UsageError

__all__ = [
    "PAPER_TASKS",
    "expand_tasks",
    "task_manager",
    "check_tasks",
    "fetch_tasks",
    "run_tasks",
    "task_scalars",
]

PAPER_TASKS = (
    "arc_easy",
    "arc_challenge",
    "hellaswag",
    "piqa",
    "winogrande",
    "boolq",
    "openbookqa",
    "lambada_openai",
)


# A task's accuracy: the first of these it reports (length-normalised where the task has it;
# exact match for generation tasks such as the shipped maths one).
ACCURACY_METRICS = ("acc_norm", "acc", "exact_match")


def expand_tasks(names: Sequence[str]) -> list[str]:
    """Task names with `paper` replaced by `PAPER_TASKS`."""
    return [task for name in names for task in (PAPER_TASKS if name == "paper" else [name])]


def task_manager(include_paths: Sequence[str] = ()) -> Any:
    """lm-eval's index of its tasks, the ones shipped in tail_kd/lm_eval_tasks and those in
    `include_paths` (folders of task definitions); built once per process and set of folders
    (indexing lm-eval's thousands of definitions takes seconds)."""
    return _task_manager(tuple(str(path) for path in include_paths))


@functools.cache
def _task_manager(include_paths: tuple[str, ...]) -> Any:
    from lm_eval.tasks import TaskManager

    from tail_kd.lm_eval_tasks import TASKS_DIR

    return TaskManager(include_path=[TASKS_DIR, *include_paths])


def check_tasks(manager: Any, tasks: Sequence[str], field: str = "--tasks") -> list[str]:
    """`tasks` expanded (`expand_tasks`); UsageError naming any that lm-eval does not know, and
    the `field` they came from (`--tasks`, or a recipe's `eval.tasks`)."""
    tasks = expand_tasks(tasks)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        paths = "--task-path" if field == "--tasks" else "eval.task_paths"
        raise UsageError(
            f"{field}: lm-eval knows no task {', '.join(unknown)} (its names: `lm_eval --tasks "
            f"list`; a folder of your own definitions: {paths})"
        )
    return tasks


def fetch_tasks(manager: Any, tasks: Sequence[str], *, check: bool) -> bool:
    """Load `tasks` (checked names, `check_tasks`) as lm-eval does before it scores them, which
    downloads their data into the datasets cache; True when all are there. With `check`, only
    look: the loading runs in a child process with the hub offline, which fails on anything
    missing."""
    if check:
        import json
        import os
        import subprocess
        import sys

        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        from tail_kd.lm_eval_tasks import TASKS_DIR

        paths = json.dumps([path for path in manager.include_path or [] if path != TASKS_DIR])
        code = (
            "import json, sys; from tail_kd.eval.harness import fetch_tasks, task_manager; "
            f"fetch_tasks(task_manager(json.loads({paths!r})), sys.argv[1:], check=False)"
        )
        child = subprocess.run(
            [sys.executable, "-c", code, *tasks], env=env, capture_output=True, text=True
        )
        return child.returncode == 0
    try:
        manager.load(list(tasks))
    except Exception as error:  # noqa: BLE001 - datasets and the hub raise many kinds
        raise UsageError(
            f"eval.tasks: cannot load the data of {', '.join(tasks)}: {error}. Run `tail-kd "
            "prepare-data RECIPE` where the hub can be reached (a login node), or leave the "
            "task out"
        ) from None
    return True


def run_tasks(
    model: Any,
    tasks: Sequence[str],
    manager: Any,
    *,
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """lm-eval's `tasks` (from `manager`, `task_manager`) on `model` (a
    `tail_kd.eval.evaluate.LoadedModel`): {"tasks": {name: {"accuracy", "metric", "stderr",
    "samples", ...the harness's metrics}}, "average_accuracy", "num_fewshot", "limit"}."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    tasks = check_tasks(manager, tasks)
    lm = HFLM(pretrained=model.model, tokenizer=model.tokenizer, batch_size=batch_size)
    output = simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=False,
    )
    results = {}
    for task in tasks:
        raw = output["results"][task]
        metric = next(m for m in ACCURACY_METRICS if f"{m},none" in raw)
        results[task] = {
            "accuracy": raw[f"{metric},none"],
            "metric": metric,
            "stderr": raw.get(f"{metric}_stderr,none"),
            "samples": output["n-samples"][task]["effective"],
            **{key: value for key, value in raw.items() if isinstance(value, float)},
        }
    accuracies = [r["accuracy"] for r in results.values()]
    return {
        "tasks": results,
        "average_accuracy": sum(accuracies) / len(accuracies) if accuracies else math.nan,
        "num_fewshot": num_fewshot,
        "limit": limit,
    }


def task_scalars(benchmarks: dict[str, Any]) -> dict[str, float]:
    """`run_tasks`' result as TensorBoard scalars: `tasks/<name>` and `tasks/average`."""
    scalars = {f"tasks/{name}": r["accuracy"] for name, r in benchmarks["tasks"].items()}
    return {**scalars, "tasks/average": benchmarks["average_accuracy"]}
