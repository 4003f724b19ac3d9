"""Compose the project's Hydra config from Python (tests, benchmarks, notebooks)."""

from __future__ import annotations

from pathlib import Path

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_config(*overrides: str):
    """The same config `python -m poisonlab.run <overrides>` would get (without `hydra.*`)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name="config", overrides=list(overrides))
