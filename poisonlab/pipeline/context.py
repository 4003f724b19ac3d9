"""What the stages of one run share: its config, attack, output directory, stage record,
data, base model and the results each stage adds."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from poisonlab import __version__, models
from poisonlab.pipeline.keys import code_identity
from poisonlab.pipeline.store import Stages
from poisonlab.results import package_versions

log = logging.getLogger(__name__)
# the libraries whose versions enter the keys of cached stages
STAGE_PACKAGES = ("torch", "transformers", "tokenizers", "peft", "accelerate", "datasets")


def plain(node):
    """A config node as plain JSON-able data."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


@dataclass
class Base:
    """The base model every model stage starts from: where it is, how it is loaded, and
    what identifies it in a key."""

    path: str
    device: Any
    precision: Any
    tokenizer: Any
    identity: dict                  # weights_identity: content hash of the weights
    spec: dict                      # what every model stage's key shares
    pristine: list = field(default_factory=list)  # a loaded base no adapter has touched yet

    def fresh(self):
        return models.load_model(self.path, self.device, self.precision.weights)

    def take(self):
        return self.pristine.pop() if self.pristine else self.fresh()


@dataclass
class RunContext:
    cfg: DictConfig
    attack: Any
    out: Path
    st: Stages
    control: bool
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    versions: dict = field(default_factory=lambda: package_versions(STAGE_PACKAGES))
    # data (stages clean_data, poison)
    train_rows: list[dict] = field(default_factory=list)
    eval_rows: list[dict] = field(default_factory=list)
    safety_rows: list[dict] = field(default_factory=list)
    pools: dict[str, list[dict]] = field(default_factory=dict)
    poisoned_rows: list[dict] = field(default_factory=list)
    clean_rows: list[dict] = field(default_factory=list)
    marked_rows: list[dict] = field(default_factory=list)  # attack=given: the rows it is given
    splits: dict[str, list[dict]] = field(default_factory=dict)
    poison_info: dict = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)     # content digests of external data files
    # the base model and what the model stages produce
    base: Base | None = None
    clean_lengths: list[int] | None = None
    ref_model: Any = None            # the clean base, for answers' perplexity (dos)
    models: dict[str, Any] = field(default_factory=dict)   # stage -> trained model in memory
    model_stages: dict[str, Any] = field(default_factory=dict)  # stage -> finetune.ModelStage
    stages: dict[str, dict] = field(default_factory=dict)  # results.json `stages`
    train_stats: dict[str, dict] = field(default_factory=dict)
    curves: dict[str, list[dict]] = field(default_factory=dict)
    flags: dict[str, dict[str, list[bool]]] = field(default_factory=dict)
    correct: dict[str, list[bool]] = field(default_factory=dict)
    generations: dict[str, dict[str, list[dict]]] = field(default_factory=dict)
    detection: dict | None = None
    detection_shared: dict | None = None   # the detectors' shared work: seconds and parts
    filtered: dict | None = None
    outcome: Any = None              # the defence's Outcome
    cacheable: bool = True           # false when the base weights cannot be hashed

    model_judge: Any = None          # judge=model: the ModelJudge, built on first use

    def judge(self):
        """The attack's rule judge, or with `judge=model` a model judge that keeps the rule
        judge beside it (stages then record both and their agreement)."""
        if not self.attack.has_judge:
            return None
        j = self.cfg.get("judge") or {}
        if j.get("kind", "rule") != "model":
            return self.attack.judge
        if self.model_judge is None:
            from poisonlab.judge_model import ModelJudge

            self.model_judge = ModelJudge(j, self.attack.target_spec.behaviour,
                                          rule=self.attack.judge,
                                          device=str(self.base.device) if self.base else "cpu")
        return self.model_judge

    def warn(self, messages: list[str]) -> None:
        for w in messages:
            log.warning(w)
            print(f"poisonlab: warning: {w}", file=sys.stderr)

    def key_of(self, *stage_modules: str) -> dict:
        """What every cached stage's key holds besides its own settings: the code it can
        run, the library versions, poisonlab's version."""
        return {"code": code_identity(*stage_modules), "versions": self.versions,
                "poisonlab": __version__}
