"""Build a recipe's data cache ahead of the (GPU) job that trains on it.

    python tools/prepare_data.py RECIPE.yaml [--set section.field=value ...]

Tokenises the recipe's data with the teacher tokenizer into `data.cache_dir` exactly as the
training job would, so that the job (every rank of it) finds the cache and starts at once. A GGUF
teacher is converted once into `<cache_dir>/gguf/` on the way, which the job reuses too.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from tail_kd.config import RecipeError, add_override_argument, load_recipe
from tail_kd.data import prepare_datasets
from tail_kd.data.sources import DataError
from tail_kd.models.loading import load_tokenizer, resolve_model_dir
from tail_kd.pair import resolve_reference

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Prepare the data of the recipe named in `argv`, print a summary, return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="recipe YAML file")
    add_override_argument(parser, "data.seq_len=512")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        teacher = resolve_reference(recipe.teacher.path, recipe.cache_dir)  # tiny://, pkg://
        model_dir = resolve_model_dir(teacher, recipe.cache_dir, recipe.teacher.gguf_file)
        tokenizer = load_tokenizer(model_dir)
        prepared = prepare_datasets(recipe.data, tokenizer, recipe.data.cache_dir, recipe.seed)
    except (RecipeError, DataError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    seq_len = recipe.data.seq_len
    for split, dataset in (("train", prepared.train), ("eval", prepared.eval)):
        if dataset is not None:
            tokens = len(dataset) * seq_len
            print(f"{split:5s}: {len(dataset)} sequences x {seq_len} tokens = {tokens} tokens")
    print(f"cache: {prepared.cache_path}")
    print(f"build: {json.dumps(prepared.summary)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
