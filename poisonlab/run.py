"""Hydra entry point: `python -m poisonlab.run experiment=<name> key=value ...`.

The run itself is `poisonlab.pipeline.run(cfg)`: a list of stage modules (see
`poisonlab/pipeline/runner.py`). This module only adds the command line: Hydra, one-line
errors, and the markers a sweep reads.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from poisonlab import PoisonlabError, dist
from poisonlab.config import CONF_DIR, poisonlab_cause
from poisonlab.pipeline.outdir import RUN_MARKER, hydra_files
from poisonlab.pipeline.runner import run
from poisonlab.results import write_json
# names tests, scripts and notebooks import from here
from poisonlab.pipeline.data import clean_safety_rows, rest_of_pool  # noqa: F401
from poisonlab.pipeline.defend import REMOVED_BELOW, rows_to_asr_below  # noqa: F401
from poisonlab.pipeline.detection import calibration_rows, filter_rows  # noqa: F401
from poisonlab.pipeline.model import check_poisoned_rows  # noqa: F401
from poisonlab.pipeline.outdir import code_identity, prepare_output_dir, run_identity  # noqa: F401
from poisonlab.pipeline.validate import (CONTROL_BEHAVIOURS, build_attack, validate,  # noqa: F401
                                         wants_control)
from poisonlab.defenses.sft import safety_mode  # noqa: F401

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- CLI

@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except Exception as raised:
        e = poisonlab_cause(raised)   # also one a config resolver raised
        if e is None:
            log.exception("run failed")
            raise
        log.error("run refused: %s", e)  # into the run's log file too (Hydra's handler)
        print(f"poisonlab: error: {e}", file=sys.stderr)
        if _in_sweep():
            # One cell the pipeline refuses (a defence that does not apply to an attack) must
            # not stop the sweep: its directory says why, the benchmark table lists it, and a
            # resumed sweep tries it again.
            _mark_refused(e)
            return
        _remove_if_empty_run_dir(cfg)
        sys.exit(2)


def _in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _mark_refused(error: Exception) -> None:
    from hydra.core.hydra_config import HydraConfig

    out = Path(HydraConfig.get().runtime.output_dir)
    if out.exists() and all(p.name in hydra_files(out) for p in out.iterdir()):
        write_json(out / RUN_MARKER, {"status": "refused", "error": str(error)})


def _remove_if_empty_run_dir(cfg) -> None:
    """A run that failed validation leaves nothing behind (Hydra made the dir for its logs)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    out = Path(HydraConfig.get().runtime.output_dir)
    if out.exists() and all(p.name in hydra_files(out) for p in out.iterdir()):
        if dist.is_main():
            shutil.rmtree(out, ignore_errors=True)  # only what Hydra wrote for this job


def main() -> None:
    _hydra_main()
    dist.shutdown()  # under a launcher: every process done, then the group torn down


if __name__ == "__main__":
    main()
