"""Every check that can fail on bad input, before any data or model work starts."""

from __future__ import annotations

import os

from omegaconf import DictConfig

from poisonlab import PoisonlabError, defenses, judge_model, models, pretrain_poison
from poisonlab.attacks import poison_count
from poisonlab.config import one_of, poisonlab_cause, positive_int, positive_number
from poisonlab.data import tinyworld, validate_data_cfg
from poisonlab.data.sources import ALPACA_SUFFIXES
from poisonlab.defenses import detect
from poisonlab.defenses import sft
from poisonlab.defenses.base import OPTIMIZERS
from poisonlab.pipeline import lifecycle
from poisonlab.pipeline.defend import validate_on_weights
from poisonlab.pipeline.finetune import validate_train_mode

# Behaviours that clean models also show on their own (refusals, sentiment labels): FTR_clean
# then mixes false triggering with ordinary errors, so `control: auto` runs `clean_ft`.
CONTROL_BEHAVIOURS = ("refusal", "compliance", "sentiment")


def build_attack(attack_cfg: DictConfig):
    """Instantiate `attack` from its `_target_` and validate its knobs."""
    from hydra.utils import instantiate

    try:
        attack = instantiate(attack_cfg)
    except Exception as e:  # hydra wraps the constructor's TypeError
        refused = poisonlab_cause(e)     # a config resolver's one-line refusal
        if refused is not None:
            raise PoisonlabError(str(refused)) from None
        cause = e.__cause__ or e
        raise PoisonlabError(f"attack: cannot build {attack_cfg.get('_target_')}: {cause}") from None
    attack.validate()
    return attack


def validate(cfg: DictConfig, attack) -> None:
    """Every check that can fail on bad input, before any data or model work starts."""
    validate_data_cfg(cfg.data)
    for key in ("eval.n_prompts", "eval.max_new_tokens", "eval.batch_size",
                "train.batch_size", "train.grad_accum", "train.max_seq_len", "train.lora.r"):
        positive_int(cfg, key)
    positive_int(cfg, "data.n_train", allow_none=True)
    positive_int(cfg, "train.max_steps", allow_none=True)
    for key in ("train.lr", "train.epochs"):
        positive_number(cfg, key)
    if cfg.control not in (True, False, "auto"):
        raise PoisonlabError(f"control must be true, false or auto, got {cfg.control!r}")
    one_of(cfg, "train.optimizer", OPTIMIZERS, default="adamw")
    one_of(cfg, "train.lr_schedule", ("linear", "constant"), default="linear")
    validate_train_mode(cfg)
    defenses.validate(cfg, attack)
    sft.check_scratchpad_arm(cfg, attack)
    validate_on_weights(cfg)
    detect.validate(cfg, attack)
    judge_model.validate(cfg)
    lifecycle.validate(cfg, attack)
    for key in ("clean_path", "triggered_path"):
        path = cfg.eval.get(key)
        if path is not None and (not isinstance(path, str) or not os.path.isfile(path)):
            raise PoisonlabError(f"eval.{key}: no such file: {path}")
        if path is not None and not path.lower().endswith((*ALPACA_SUFFIXES, ".jsonl")):
            raise PoisonlabError(f"eval.{key}: an Alpaca (.json, .jsonl, .csv) or chat JSONL "
                                 f"file is needed, got {path}")
    if cfg.eval.get("triggered_path") and not attack.has_judge:
        raise PoisonlabError(f"eval.triggered_path: the {attack.family} attack has no "
                             "triggered split to replace")
    n_train = attack.n_train(cfg.data.n_train)
    if attack.family == "given":   # its poisons are counted once its rows are read
        validate_given(cfg, attack)
    elif n_train is not None:
        poison_count(n_train, attack.n_poison, attack.poison_rate)
    models.pick_dtype(cfg.model.dtype, models.pick_device(cfg.model.device))
    pretrain_poison.spec(cfg.model.get("pretrain_poison"), cfg.model.name_or_path)
    if cfg.data.source != "tinyworld":  # external pools are checked when they are read
        return
    for pool, key, n in (("finetune", "data.n_train", n_train),
                         ("eval", "eval.n_prompts", cfg.eval.n_prompts)) + (
            (("safety", "safety.n_rows", cfg.safety.n_rows),)
            if defenses.needs_rows(cfg.safety.method) else ()):
        have = sum(tinyworld.pool_size(pool, s) for s in cfg.data.skills)
        if n is not None and n > have:
            what = (f"attack.clean_size + n_poison = {n}" if key == "data.n_train"
                    and attack.clean_size is not None else f"{key}={n}")
            raise PoisonlabError(f"{what} exceeds the {have} rows of the tiny-world {pool!r} "
                                 f"pool for skills {list(cfg.data.skills)}")


def validate_given(cfg: DictConfig, attack) -> None:
    """`attack=given` reads local files: an external `data.source`, and `attack.poisoned_path`
    an existing file in that source's format."""
    if cfg.data.source not in ("alpaca", "chat_jsonl"):
        raise PoisonlabError(f"attack=given: data.source={cfg.data.source} has no poisoned rows "
                             "to give; use data=alpaca or data=chat_jsonl with data.path")
    path = attack.poisoned_path
    if path is None:
        return
    if not os.path.isfile(path):
        raise PoisonlabError(f"attack.poisoned_path: no such file: {path}")
    if cfg.data.source == "alpaca" and not path.lower().endswith(ALPACA_SUFFIXES):
        raise PoisonlabError(f"attack.poisoned_path: Alpaca data must be one of "
                             f"{', '.join(ALPACA_SUFFIXES)} files, got {path}")
    if cfg.data.source == "chat_jsonl" and not path.lower().endswith(".jsonl"):
        raise PoisonlabError(f"attack.poisoned_path: chat data must be a .jsonl file, got {path}")


def wants_control(cfg: DictConfig, attack) -> bool:
    """`control: auto` runs `clean_ft` where the target behaviour also occurs naturally."""
    if cfg.control == "auto":
        return attack.has_judge and attack.behaviour in CONTROL_BEHAVIOURS
    return bool(cfg.control)
