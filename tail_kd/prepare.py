"""`tail-kd prepare-data RECIPE [--set KEY=VALUE ...] [--check]`: what a training job of the recipe
would fetch or build, done once ahead of it (on a login node, with network), into caches that
every rank of every job then only reads:

    teacher   a GGUF file converted into <cache_dir>/gguf/; a hub model's config, tokenizer and
              weights downloaded into the Hugging Face cache
    student   with `student.init: pretrained` its hub model likewise (with `config`, its config and
              tokenizer only; a derived student needs nothing)
    data      tokenised with the teacher's tokenizer (without a teacher, the student's) into
              <cache_dir>/data/, exactly as the job would do it
    tasks     with `eval.tasks`, the benchmarks' data (lm-evaluation-harness, tail_kd/eval/
              harness.py) downloaded into the Hugging Face datasets cache; an unknown task name
              is refused here, before anything is downloaded
    teacher states
              with `teacher.cached_states`, the teacher's hidden states of the data: only
              looked for (`tail-kd cache-teacher` writes them, with the teacher on GPUs); a job
              refuses to start without them

`--check` fetches and builds nothing: it reports each item as ready or missing and exits 0 when
all are ready, 1 otherwise. The Slurm scripts run it before launching and, when everything is
ready, run the job offline (HF_HUB_OFFLINE=1): compute nodes often have no network, and a job
whose every rank downloads a teacher is slow even where they do.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tail_kd.config import Recipe, add_override_argument, load_recipe
from tail_kd.data.sources import open_source
from tail_kd.exit_status import EXIT_USAGE, UsageError

__all__ = ["Item", "prepare", "main"]


@dataclass(frozen=True)
class Item:
    """One thing a job needs, and whether it is there."""

    name: str  # teacher, student, data
    what: str  # what it is, for people
    ready: bool
    details: tuple[str, ...] = ()  # more lines for people


def prepare(recipe: Recipe, *, check: bool) -> list[Item]:
    """Fetch and build what `recipe`'s jobs need (or with `check`, only look); report each item."""
    open_source(recipe.data, recipe.seed)  # a missing data file: say so before the models load
    tasks = _checked_tasks(recipe)  # an unknown benchmark: likewise
    items = []
    if recipe.teacher is not None:
        teacher = recipe.teacher
        items.append(_model_item("teacher", teacher.path, recipe, True, teacher.gguf_file, check))
    student = recipe.student
    if student.init != "derived":
        items.append(
            _model_item("student", student.path, recipe, student.init == "pretrained", None, check)
        )
    # The data are tokenised with the teacher's tokenizer, or without a teacher the student's.
    tokenizer_item = items[0]
    items.append(
        _data_item(recipe, check)
        if tokenizer_item.ready
        else Item("data", f"needs the {tokenizer_item.name}'s tokenizer", False)
    )
    if recipe.cached_teacher_states:
        data_item = items[-1]
        items.append(
            _states_item(recipe)
            if data_item.ready
            else Item("states", "teacher hidden states: need the data", False)
        )
    if tasks:
        items.append(_tasks_item(*tasks, check))
    return items


def _states_item(recipe: Recipe) -> Item:
    from tail_kd.teacher_cache import FIX, problem, spec_of

    spec = spec_of(recipe)
    why = problem(spec)
    what = f"teacher hidden states (teacher.cached_states) in {spec.entry}"
    return Item("states", what, why is None, () if why is None else (why, FIX))


def _checked_tasks(recipe: Recipe) -> tuple[object, list[str]] | None:
    """(lm-eval's task index, the recipe's task names expanded), or None without `eval.tasks`."""
    if not recipe.eval.tasks:
        return None
    from tail_kd.eval.harness import check_tasks, task_manager

    manager = task_manager(recipe.eval.task_paths)
    return manager, check_tasks(manager, recipe.eval.tasks, field="eval.tasks")


def _tasks_item(manager: object, tasks: list[str], check: bool) -> Item:
    from tail_kd.eval.harness import fetch_tasks

    ready = fetch_tasks(manager, tasks, check=check)
    return Item("tasks", f"benchmark data of {', '.join(tasks)} (datasets cache)", ready)


def _model_item(
    name: str, reference: str, recipe: Recipe, weights: bool, gguf_file: str | None, check: bool
) -> Item:
    from tail_kd.models.loading import (
        find_gguf,
        fetch_from_hub,
        gguf_conversion,
        is_hub_id,
        resolve_model_dir,
    )
    from tail_kd.pair import resolve_reference

    reference = resolve_reference(reference, recipe.cache_dir)  # tiny:// is built, pkg:// found
    if is_hub_id(reference, gguf_file):
        what = f"hub model {reference} ({'with' if weights else 'without'} weights)"
        try:
            folder = fetch_from_hub(reference, weights=weights, local_only=check)
        except (OSError, ValueError) as error:
            if not check:
                raise UsageError(f"{name}: cannot download {reference}: {error}") from None
            return Item(name, what, False)
        return Item(name, f"{what} in {folder}", True)
    gguf = find_gguf(reference, gguf_file)
    if gguf is not None and check:
        target = gguf_conversion(gguf, recipe.cache_dir)
        return Item(name, f"{gguf} converted into {target}", target.is_dir())
    folder = resolve_model_dir(reference, recipe.cache_dir, gguf_file)  # converts a GGUF file
    return Item(name, f"local model {folder}", True)


def _data_item(recipe: Recipe, check: bool) -> Item:
    from tail_kd.data.cache import is_complete
    from tail_kd.data.prepared import cached_entry, prepare_datasets
    from tail_kd.models import load_tokenizer, resolve_model_dir
    from tail_kd.pair import resolve_reference

    model = recipe.teacher or recipe.student  # whose tokenizer tokenises the data
    gguf_file = recipe.teacher.gguf_file if recipe.teacher else None
    reference = resolve_reference(model.path, recipe.cache_dir)
    tokenizer = load_tokenizer(resolve_model_dir(reference, recipe.cache_dir, gguf_file))
    data = recipe.data
    if check:
        entry = cached_entry(data, tokenizer, data.cache_dir, recipe.seed)
        return Item("data", f"{data.source} tokenised into {entry}", is_complete(entry))
    prepared = prepare_datasets(data, tokenizer, data.cache_dir, recipe.seed)
    details = [
        f"{split:5s}: {len(dataset)} sequences x {data.seq_len} tokens = "
        f"{len(dataset) * data.seq_len} tokens"
        for split, dataset in (("train", prepared.train), ("eval", prepared.eval))
        if dataset is not None
    ]
    details += [f"cache: {prepared.cache_path}", f"build: {json.dumps(prepared.summary)}"]
    return Item("data", f"{data.source} tokenised", True, tuple(details))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tail-kd prepare-data", description=__doc__.split("\n\n")[0].split(": ", 1)[1]
    )
    parser.add_argument("recipe", help="recipe YAML file")
    add_override_argument(parser, "data.seq_len=512")
    parser.add_argument(
        "--check", action="store_true", help="fetch and build nothing: exit 0 if all is ready"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        items = prepare(recipe, check=args.check)
    except (UsageError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    for item in items:
        print(f"{item.name:8s} {'ready  ' if item.ready else 'MISSING'} {item.what}")
        for line in item.details:
            print(f"         {line}")
    if all(item.ready for item in items):
        print(f"cache: {Path(recipe.cache_dir)} (and the Hugging Face cache): ready")
        return 0
    missing = {item.name for item in items if not item.ready}
    command = "cache-teacher" if missing == {"states"} else "prepare-data"  # what builds them
    print(f"not ready: run `tail-kd {command} {args.recipe}` (with the same --set) first")
    return 1


if __name__ == "__main__":
    sys.exit(main())
