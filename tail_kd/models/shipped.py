"""The configurations tail-kd ships for the hub models its recipes name (tail_kd/assets/README.md).

`tail-kd plan` reads a model's shape from them instead of the hub, so that planning works on an
offline machine or a compute node; training always reads the model's own files.
"""

from __future__ import annotations

from pathlib import Path

from tail_kd.models.loading import is_hub_id

__all__ = ["SHIPPED_CONFIGS", "shipped_config_dir"]

SHIPPED_CONFIGS = Path(__file__).resolve().parent.parent / "assets" / "configs"


def shipped_config_dir(reference: str | None) -> Path | None:
    """The folder of the shipped `config.json` of the hub model `reference` (`owner/name`), or
    None when `reference` is not a hub id or tail-kd ships no config for it."""
    if not reference or not is_hub_id(reference):
        return None
    folder = SHIPPED_CONFIGS / reference
    return folder if (folder / "config.json").is_file() else None
