#!/usr/bin/env python
"""Fetch a recipe's models and build its data cache ahead of a GPU job.

    python tools/prepare_data.py RECIPE.yaml [--set section.field=value ...] [--check]

The work is done by `tail_kd.prepare` (also `tail-kd prepare-data`); this file lets a checkout
run it without installing the package.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tail_kd.prepare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
