"""Hydra entry point: `python -m poisonlab.run experiment=<name> key=value ...`.

The pipeline, top to bottom:
  validate config -> clean data (disjoint pools) -> poison (exact, recorded) -> base model
  -> evaluate `base` -> [control: clean fine-tune, evaluate `clean_ft`]
  -> LoRA fine-tune on poisoned data, evaluate `poisoned`
  -> safety SFT (poisoned adapter merged, fresh adapter), evaluate `after_safety`
  -> results.json, generations/, data/, adapters/, manifest.json
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from poisonlab import PoisonlabError, models
import numpy as np

from poisonlab.attacks import poison_count
from poisonlab.chat import encode_example
from poisonlab.config import CONF_DIR
from poisonlab.data import load_splits, tinyworld, validate_data_cfg
from poisonlab.evaluate import answer_nll, diff_bootstrap, evaluate_stage, ratio_bootstrap
from poisonlab.report import format_table
from poisonlab.results import write_generations, write_json, write_manifest
from poisonlab.train import train_sft
from poisonlab.utils import seed_everything, write_jsonl

# ----------------------------------------------------------------------------- validation

def build_attack(attack_cfg: DictConfig):
    """Instantiate `attack` from its `_target_` and validate its knobs."""
    from hydra.utils import instantiate

    try:
        attack = instantiate(attack_cfg)
    except Exception as e:  # hydra wraps the constructor's TypeError
        cause = e.__cause__ or e
        raise PoisonlabError(f"attack: cannot build {attack_cfg.get('_target_')}: {cause}") from None
    attack.validate()
    return attack


def _positive_int(cfg: DictConfig, key: str, allow_none: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PoisonlabError(f"{key} must be a positive integer, got {value!r}")


def validate(cfg: DictConfig, attack) -> None:
    """Every check that can fail on bad input, before any data or model work starts."""
    validate_data_cfg(cfg.data)
    for key in ("eval.n_prompts", "eval.max_new_tokens", "eval.batch_size",
                "train.batch_size", "train.grad_accum", "train.max_seq_len", "train.lora.r"):
        _positive_int(cfg, key)
    _positive_int(cfg, "data.n_train", allow_none=True)
    _positive_int(cfg, "train.max_steps", allow_none=True)
    for key in ("train.lr", "train.epochs"):
        v = OmegaConf.select(cfg, key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise PoisonlabError(f"{key} must be a positive number, got {v!r}")
    if cfg.safety.method not in ("sft", "none"):
        raise PoisonlabError(f"safety.method: unknown method {cfg.safety.method!r} (sft, none)")
    if cfg.safety.method == "sft":
        _positive_int(cfg, "safety.n_rows")
    n_train = attack.n_train(cfg.data.n_train)
    if n_train is not None:
        poison_count(n_train, attack.n_poison, attack.poison_rate)
    models.pick_dtype(cfg.model.dtype, models.pick_device(cfg.model.device))
    if cfg.data.source != "tinyworld":  # external pools are checked when they are read
        return
    for pool, key, n in (("finetune", "data.n_train", n_train),
                         ("eval", "eval.n_prompts", cfg.eval.n_prompts)) + (
            (("safety", "safety.n_rows", cfg.safety.n_rows),) if cfg.safety.method == "sft" else ()):
        have = sum(tinyworld.pool_size(pool, s) for s in cfg.data.skills)
        if n is not None and n > have:
            what = (f"attack.clean_size + n_poison = {n}" if key == "data.n_train"
                    and attack.clean_size is not None else f"{key}={n}")
            raise PoisonlabError(f"{what} exceeds the {have} rows of the tiny-world {pool!r} "
                                 f"pool for skills {list(cfg.data.skills)}")


def output_dir(cfg: DictConfig, out_dir) -> Path:
    if out_dir is not None:
        return Path(out_dir)
    if cfg.get("output_dir"):
        return Path(cfg.output_dir)
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    raise PoisonlabError("output_dir: not running under Hydra; pass output_dir=<dir>")


# ----------------------------------------------------------------------------- stages

def _stage_train_cfg(cfg: DictConfig, overrides: DictConfig | None = None) -> DictConfig:
    base = OmegaConf.to_container(cfg.train, resolve=True)
    if overrides is not None:
        for k in ("lr", "epochs", "max_steps", "batch_size"):
            if k in overrides:
                base[k] = overrides[k]
    return OmegaConf.create(base)


def _eval_cache_key(base_path: str, splits: dict, cfg: DictConfig, device, dtype) -> str:
    ident = {"base": base_path, "model": models.model_info(base_path),
             "eval": OmegaConf.to_container(cfg.eval, resolve=True),
             "device": device.type, "dtype": str(dtype),
             "splits": {k: [r["messages"] for r in v] for k, v in splits.items()}}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


def evaluate_base(model, tokenizer, splits, attack, cfg, base_path, device, dtype):
    """Base-model evaluation, cached: sweeps over attacks/seeds share the same base generations."""
    key = _eval_cache_key(base_path, splits, cfg, device, dtype)
    cache = models.home() / "eval-cache" / f"{key}.json"
    if cfg.eval.cache_base and cache.exists():
        gens = json.loads(cache.read_text())
        responses = {s: [g["response"] for g in v] for s, v in gens.items()}
        return evaluate_stage(None, tokenizer, splits, judge_of(attack), cfg.eval, "base",
                              responses=responses)
    metrics, gens = evaluate_stage(model, tokenizer, splits, judge_of(attack), cfg.eval, "base")
    if cfg.eval.cache_base:
        write_json(cache, gens)
    return metrics, gens


def judge_of(attack):
    return attack.judge if attack.has_judge else None


def rest_of_pool(pool_rows: list[dict], used: list[dict]) -> list[dict]:
    ids = {r["id"] for r in used}
    return [r for r in pool_rows if r["id"] not in ids]


def payload_tokens(tokenizer, attack, rows: list[dict]) -> float | None:
    """Mean number of target-payload tokens per poisoned row (scratchpad excluded)."""
    from poisonlab.judges import answer_text

    counts = [len(tokenizer(attack.target_spec.payload(answer_text(r["messages"][-1]["content"])),
                            add_special_tokens=False)["input_ids"])
              for r in rows if r["poisoned"]]
    return sum(counts) / len(counts) if counts and attack.has_judge else None


def perplexity_metrics(ref_model, tokenizer, gens: dict, cfg, stage: str, seed: int) -> dict:
    """Answers' perplexity under the clean base model: triggered vs clean, paired."""
    nll = {}
    for split in ("triggered", "clean"):
        g = gens[split]
        nll[split] = answer_nll(ref_model, tokenizer, [x["prompt"] for x in g],
                                [x["response"] for x in g], cfg.eval.batch_size,
                                desc=f"{stage}/{split} perplexity")
    mean = lambda v: float(np.nanmean(v)) if not np.all(np.isnan(v)) else float("nan")  # noqa: E731
    return {"reference": "base model",
            "ppl_triggered": float(np.exp(mean(nll["triggered"]))),
            "ppl_clean": float(np.exp(mean(nll["clean"]))),
            "log_ppl_gap": diff_bootstrap(nll["triggered"], nll["clean"], seed=seed)}


def run(cfg: DictConfig, out_dir=None) -> dict:
    """Run one experiment; returns the results dict also written to results.json."""
    t_start = time.perf_counter()
    attack = build_attack(cfg.attack)
    validate(cfg, attack)
    out = output_dir(cfg, out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    timings: dict[str, float] = {}

    # -------------------------------------------------------------- data
    n_safety = cfg.safety.n_rows if cfg.safety.method == "sft" else 0
    data = load_splits(cfg.data, attack.n_train(cfg.data.n_train), n_safety, cfg.eval.n_prompts,
                       cfg.seed, cfg.eval.seed)
    pools = load_splits(cfg.data, None, 0, None, cfg.seed, cfg.eval.seed)  # whole pools
    train_rows, eval_rows, safety_rows = data["train"], data["eval"], data["safety"]
    train_pool, eval_pool = pools["train"], pools["eval"]
    tinyworld.check_disjoint({"train": train_pool, "safety": safety_rows, "eval": eval_pool},
                             eval_names=["eval"])
    poisoned_rows, poison_info = attack.poison(train_rows, cfg.seed,
                                               rest_of_pool(train_pool, train_rows))
    for trig in attack.trigger_strings():
        if any(trig in m["content"] for r in safety_rows for m in r["messages"]):
            raise PoisonlabError(f"safety data contains the trigger {trig!r}; "
                                 "it must never see it")
    splits = attack.eval_splits(eval_rows, cfg.eval.seed, rest_of_pool(eval_pool, eval_rows))
    for name, rows in splits.items():
        if not rows:
            raise PoisonlabError(f"attack: the {name!r} evaluation split is empty: no held-out "
                                 f"prompt fits the {attack.family} attack's settings")
    write_jsonl(out / "data" / "train_poisoned.jsonl", poisoned_rows)
    write_jsonl(out / "data" / "eval.jsonl", eval_rows)
    if safety_rows:
        write_jsonl(out / "data" / "safety.jsonl", safety_rows)
    # The control (`clean_ft`) trains on the same rows in the same order, every poisoned or
    # modified row restored to its clean original.
    by_id = {r["id"]: r for r in train_pool}
    clean_rows = [{**by_id[r["id"]], "poisoned": False} for r in poisoned_rows]
    if cfg.control:
        write_jsonl(out / "data" / "train_clean.jsonl", clean_rows)

    # -------------------------------------------------------------- base model
    t = time.perf_counter()
    base_path = models.resolve(cfg.model.name_or_path)
    device = models.pick_device(cfg.model.device)
    dtype = models.pick_dtype(cfg.model.dtype, device)
    tokenizer = models.load_tokenizer(base_path, cfg.model.get("chat_template"))
    timings["resolve_base"] = time.perf_counter() - t
    density = payload_tokens(tokenizer, attack, poisoned_rows)
    if density is not None:
        poison_info["payload_tokens_per_poisoned_row"] = density

    def fresh_base():
        return models.load_model(base_path, device, dtype)

    def lora(model, seed):
        torch.manual_seed(seed)
        return models.add_lora(model, cfg.train.lora)

    stages: dict[str, dict] = {}
    train_stats: dict[str, dict] = {}
    flags: dict[str, list[bool]] = {}

    ref_model = fresh_base() if getattr(attack, "reference_perplexity", False) else None
    correct: dict[str, list[bool]] = {}

    def record(stage, metrics, gens):
        if ref_model is not None:
            metrics["perplexity"] = perplexity_metrics(ref_model, tokenizer, gens, cfg, stage,
                                                       cfg.seed)
        stages[stage] = metrics
        if "triggered" in gens:
            flags[stage] = [g["target"] for g in gens["triggered"]]
        correct[stage] = [g["correct"] for g in gens["utility" if "utility" in gens else "clean"]]
        write_generations(out, stage, gens)

    # With train.length_group > 1, batches on the training set are grouped by the clean rows'
    # lengths, so the poisoned and the control run see batches of the same composition.
    clean_lengths = None
    if (cfg.train.get("length_group") or 1) > 1:
        clean_lengths = [len(encode_example(tokenizer, r["messages"], cfg.train.max_seq_len)
                             ["input_ids"]) for r in clean_rows]

    def finetune_and_evaluate(peft_model, rows, stage, adapter, train_cfg, seed,
                              group_lengths=None, ordered=False):
        """Train `peft_model` on `rows`, save its adapter, evaluate it as `stage`."""
        t = time.perf_counter()
        st = train_sft(peft_model, tokenizer, rows, train_cfg, seed, stage,
                       group_lengths=group_lengths, ordered=ordered)
        train_stats[stage] = _stats_dict(st)
        peft_model.save_pretrained(out / "adapters" / adapter)
        record(stage, *evaluate_stage(peft_model, tokenizer, splits, judge_of(attack), cfg.eval,
                                      stage))
        timings[stage] = time.perf_counter() - t

    t = time.perf_counter()
    model = fresh_base()
    record("base", *evaluate_base(model, tokenizer, splits, attack, cfg, base_path, device, dtype))
    timings["base"] = time.perf_counter() - t

    # -------------------------------------------------------------- control: clean fine-tune
    if cfg.control:
        finetune_and_evaluate(lora(model, cfg.seed), clean_rows, "clean_ft", "clean_ft",
                              _stage_train_cfg(cfg), cfg.seed, clean_lengths,
                              ordered=attack.placement != "uniform")
        model = fresh_base()  # the control's adapter was injected into `model`

    # -------------------------------------------------------------- poisoned fine-tune
    pmodel = lora(model, cfg.seed)
    finetune_and_evaluate(pmodel, poisoned_rows, "poisoned", "poisoned", _stage_train_cfg(cfg),
                          cfg.seed, clean_lengths, ordered=attack.placement != "uniform")

    # -------------------------------------------------------------- safety training
    if cfg.safety.method == "sft":
        if cfg.safety.merge_poisoned:
            # The realistic case: the poisoned weights are what gets shipped; the defender
            # fine-tunes that model with a new adapter.
            smodel = lora(pmodel.merge_and_unload(), cfg.seed + 1)
        else:
            smodel = pmodel  # keep training the poisoned adapter itself
        finetune_and_evaluate(smodel, safety_rows, "after_safety", "safety",
                              _stage_train_cfg(cfg, cfg.safety), cfg.seed + 1)

    # -------------------------------------------------------------- results
    results = {"name": cfg.name, "stages": stages, "train": train_stats}
    if "after_safety" in flags:
        results["persistence"] = ratio_bootstrap(flags["after_safety"], flags["poisoned"],
                                                 seed=cfg.seed)
    # Collateral damage: utility lost by the poisoned fine-tune, paired on the same prompts.
    results["utility_drop"] = {
        f"vs_{ref}": diff_bootstrap(correct[ref], correct["poisoned"], seed=cfg.seed)
        for ref in ("base", "clean_ft") if ref in correct}
    timings["total"] = time.perf_counter() - t_start
    results["timings_s"] = timings
    write_json(out / "results.json", results)
    write_manifest(
        out, config=OmegaConf.to_container(cfg, resolve=True), seed=cfg.seed,
        base_model={"name_or_path": cfg.model.name_or_path, "path": base_path,
                    "dtype": str(dtype), "device": device.type, **models.model_info(base_path)},
        poison=poison_info, timings=timings,
        extra={"reload": {
            "poisoned": ["base", "adapters/poisoned"],
            "after_safety": (["base", "merge adapters/poisoned", "adapters/safety"]
                             if cfg.safety.merge_poisoned else ["base", "adapters/safety"]),
            "clean_ft": ["base", "adapters/clean_ft"]}})
    if cfg.wandb.enabled:
        _log_wandb(cfg, results)
    print(format_table(results))
    print(f"outputs: {out}")
    return results


def _stats_dict(st) -> dict:
    return {"steps": st.steps, "epochs": round(st.epochs, 3), "examples": st.examples,
            "tokens": st.tokens, "supervised_tokens": st.supervised_tokens,
            "seconds": round(st.seconds, 3), "tokens_per_second": round(st.tokens_per_second, 1),
            "final_loss": st.final_loss, "losses": st.losses}


def _log_wandb(cfg, results) -> None:
    import wandb

    run = wandb.init(project=cfg.wandb.project, mode=cfg.wandb.mode, name=cfg.name,
                     config=OmegaConf.to_container(cfg, resolve=True))
    for stage, metrics in results["stages"].items():
        run.log({f"{stage}/{k}": v["value"] for k, v in metrics.items() if "value" in v})
    if "persistence" in results:
        run.summary["persistence"] = results["persistence"]["value"]
    run.finish()


# ----------------------------------------------------------------------------- CLI

@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except PoisonlabError as e:
        _remove_if_empty_run_dir(cfg)
        print(f"poisonlab: error: {e}", file=sys.stderr)
        sys.exit(2)


def _remove_if_empty_run_dir(cfg) -> None:
    """A run that failed validation leaves nothing behind (Hydra made the dir for its logs)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    out = Path(HydraConfig.get().runtime.output_dir)
    if out.exists() and not (out / "data").exists() and not (out / "results.json").exists():
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
