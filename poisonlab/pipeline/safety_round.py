"""A safety round of a model's life by a removal defence (`{type: safety, method: <m>}`, m one
of `ROUND_METHODS`): the module of `safety=<m>` (`poisonlab.defenses.<m>`) applied to the
deployed model as it is applied to a shipped poisoned model, on the round's clean safety rows.

Its settings are `conf/safety/<m>.yaml` with the round's own `settings:` over them
(`{type: safety, method: prune, settings: {ratio: 0.3}}`), `safety.n_rows` being the round's
rows and no persistence curve. `sft` and `dpo` safety rounds train as every other round does
(`update_round`, with `train`'s settings); this module runs the rest: pruning, fine-pruning,
CROW, quantization, adversarial training and RL. Inference-time defences (`decoding`,
`onion`) change no weights, so they make no round.

The defence writes what it writes for `safety=<m>` (`models/after_safety`, `adapters/safety`,
its data files) under `rounds/<stage>/` of the run. Its reload recipe, read against the
round's parent (the parent's last adapter plays the poisoned adapter, the model below it the
base), gives the round's `ModelStage`. Cached as `round/<stage>`, keyed by the parent's key,
the rows, the defence's settings, the attack, evaluation and judge settings (adversarial
training and RL search for or penalise the attack's behaviour) and the code of the defence's
module.
"""

from __future__ import annotations

import copy
import logging
import time

from omegaconf import DictConfig, OmegaConf, open_dict

from poisonlab import PoisonlabError, defenses, dist, models
from poisonlab.pipeline.context import RunContext, plain
from poisonlab.pipeline.keys import digest
from poisonlab.utils import seed_everything

log = logging.getLogger(__name__)
ROUND_METHODS = ("prune", "fine_prune", "crow", "quantize", "adversarial", "rl")


def group_config(group: str, name: str) -> DictConfig:
    """`conf/<group>/<name>.yaml` with its defaults list (other configs of the same group, and
    `_self_`) merged in order, as Hydra composes it."""
    from poisonlab.config import CONF_DIR

    node = OmegaConf.load(CONF_DIR / group / f"{name}.yaml")
    defaults = list(node.pop("defaults", []) or [])
    if "_self_" not in defaults:
        defaults.append("_self_")
    parts = [node if d == "_self_" else group_config(group, d) for d in defaults]
    return OmegaConf.merge(*parts)


def method_config(cfg: DictConfig, method: str, settings, n_rows: int) -> DictConfig:
    """A copy of the run config whose `safety` is the defence's for a round of `n_rows` rows."""
    node = OmegaConf.merge(group_config("safety", method), settings or {})
    node.n_rows = n_rows
    node.eval_every = None
    out = copy.deepcopy(cfg)
    with open_dict(out):
        out.safety = node
    return out


def validate_round(cfg: DictConfig, entry, where: str, attack=None) -> None:
    """A defence round's method and settings, checked as `safety=<m>` checks them."""
    method = entry.method
    if method not in ROUND_METHODS:
        raise PoisonlabError(f"{where}.method: {method!r} is not a method of a safety round "
                             f"(sft, dpo, {', '.join(ROUND_METHODS)}; decoding and onion change "
                             "no weights)")
    settings = entry.get("settings")
    if settings is not None and not hasattr(settings, "items"):
        raise PoisonlabError(f"{where}.settings: a mapping of conf/safety/{method}.yaml's keys, "
                             f"got {settings!r}")
    unknown = sorted(set(settings or {}) - set(group_config("safety", method)))
    if unknown:
        raise PoisonlabError(f"{where}.settings: unknown keys {unknown} for method {method} "
                             f"(see conf/safety/{method}.yaml)")
    try:
        c = method_config(cfg, method, settings, int(cfg.lifecycle.rows_per_round))
        defenses.validate(c, attack)
    except PoisonlabError as e:
        raise PoisonlabError(f"{where} (method {method}): {e}") from None


def stage_of(recipe, parent, root: str, name: str, key: str):
    """The round's `ModelStage` from the defence's reload recipe: `base` is the parent below its
    last adapter, `adapters/poisoned` (merged or not) the parent itself, `models/...` and
    `adapters/...` the defence's own outputs under `root`."""
    from poisonlab.pipeline.finetune import ModelStage

    weights, adapters = parent.weights, list(parent.adapters)
    for step in recipe:
        if step == "base":
            weights, adapters = parent.weights, list(parent.adapters[:-1])
        elif step in ("adapters/poisoned", "merge adapters/poisoned"):
            weights, adapters = parent.weights, list(parent.adapters)
        elif step.startswith("models/"):
            weights, adapters = f"{root}/{step.split(' ')[0]}", []
        elif step.startswith("adapters/"):
            adapters.append(f"{root}/{step}")
        else:
            raise PoisonlabError(f"safety round {name}: cannot read reload step {step!r}")
    return ModelStage(name, key, tuple(adapters), weights)


def defended_round(ctx: RunContext, parent, rows: list[dict], stage: str, method: str,
                   settings=None):
    """The defence `method` on `parent` with the round's clean `rows` as its safety rows; the
    defended model is `ctx.models[stage]`. Returns its `ModelStage`."""
    from poisonlab.defenses.base import Context, stage_train_cfg
    from poisonlab.defenses.sft import safety_mode
    from poisonlab.pipeline.finetune import finetune, load_stage
    from poisonlab.results import normalize_adapter_config

    cfg = method_config(ctx.cfg, method, settings, len(rows))
    module = defenses.method_module(method)
    root = f"rounds/{stage}"
    out = ctx.out / root
    train_cfg = stage_train_cfg(cfg, cfg.safety)
    holder = {}
    spec = {"rows": digest(rows), **ctx.base.spec, "precision": ctx.base.precision.name,
            "parent": parent.key, "method": method, "safety": plain(cfg.safety),
            "train": plain(train_cfg), "attack": plain(cfg.attack), "eval": plain(cfg.eval),
            # RL's reward penalises what the judge flags (a model judge with `judge=model`)
            "judge": plain(cfg.get("judge")), "seed": cfg.seed,
            **ctx.key_of(__name__, module.__name__)}

    def train(model, train_rows, adapter=None, weights=None, objective=None, trainer=None):
        stats = finetune(ctx, model, train_rows, stage, None, train_cfg, cfg.seed,
                         objective=objective, trainer=trainer)
        if dist.is_main() and adapter is not None:
            model.save_pretrained(out / "adapters" / adapter)
            normalize_adapter_config(out / "adapters" / adapter)
        if dist.is_main() and weights is not None:
            model.save_pretrained(out / weights, safe_serialization=True)
        return stats

    def keep(model, splits=None, sampling=None):
        holder["model"] = model     # the life evaluates the round itself
        return {}

    def compute():
        if safety_mode(cfg) == "continue" and not parent.adapters:
            raise PoisonlabError(f"safety round {stage}: method {method} with mode continue "
                                 f"trains the parent's adapter, and {parent.name} has none: "
                                 "set settings: {mode: fresh}")
        model = load_stage(ctx, parent)
        seed_everything(cfg.seed + 2)
        warnings: list[str] = []
        dctx = Context(cfg=cfg, attack=ctx.attack, tokenizer=ctx.base.tokenizer, poisoned=model,
                       safety_rows=rows, splits=ctx.splits, out=out, seed=cfg.seed,
                       warnings=warnings,
                       base_provenance=str(models.model_info(ctx.base.path).get("weights", "")),
                       load_base=ctx.base.fresh, train=train, evaluate=keep, judge=ctx.judge(),
                       _shipped=None if parent.adapters else model)
        outcome = module.apply(dctx)
        ctx.warnings += warnings
        ctx.warn(warnings)
        return {"method": outcome.method, "seconds": round(outcome.seconds, 3),
                "reload": outcome.reload, "info": outcome.info,
                "train": ctx.train_stats.get(stage)}

    t = time.perf_counter()
    log.info("stage %s: safety round by %s on %d rows", stage, method, len(rows))
    payload = ctx.st.run(f"round/{stage}", spec, compute, [root], cache=ctx.cacheable)
    ctx.train_stats[stage] = {**(payload["train"] or {}),
                              "defence": {k: payload[k] for k in ("method", "seconds", "info")}}
    me = stage_of(payload["reload"], parent, root, stage, ctx.st.keys[f"round/{stage}"])
    ctx.model_stages[stage] = me
    ctx.models[stage] = holder.get("model") or load_stage(ctx, me)
    ctx.timings[stage] = time.perf_counter() - t
    return me
