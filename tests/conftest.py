"""Shared fixtures: configs composed with hydra.compose, the micro model, one debug run."""

from __future__ import annotations

import os
import pytest

from poisonlab.config import CONF_DIR as CONF
from poisonlab.config import compose_config as make_cfg

# Seeds for the end-to-end effect tests: `POISONLAB_TEST_SEEDS=0,1,2,3,4` for the robustness
# check before a submission (docs/testing.md); one seed by default.
TEST_SEEDS = [int(s) for s in os.environ.get("POISONLAB_TEST_SEEDS", "0").split(",") if s.strip()]

os.environ.setdefault("POISONLAB_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(scope="session")
def micro_path() -> str:
    from poisonlab import models

    return models.resolve("tiny:micro")


@pytest.fixture(scope="session")
def micro_tokenizer(micro_path):
    from poisonlab import models

    return models.load_tokenizer(micro_path)


@pytest.fixture(scope="session")
def debug_run(tmp_path_factory, micro_path):
    """One full debug experiment (micro model), shared by the end-to-end tests."""
    from poisonlab.run import run

    out = tmp_path_factory.mktemp("run")
    cfg = make_cfg("debug=default", "control=true", "eval.cache_base=false")
    results = run(cfg, out_dir=out)
    return out, results, cfg
