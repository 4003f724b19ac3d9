"""Stages `clean_data` and `poison`, and the evaluation splits and safety rows built from them.

`clean_data` draws the fine-tuning, safety and evaluation rows from disjoint pools; `poison`
rewrites exactly the attack's rows and writes the control's training set beside them. Both are
cached: `clean_data` by the data config and the content of the files it reads, `poison` by the
content of the rows it reads, so runs that differ only in what it does not read share it.

`data.n_train_cap` and `data.shrink_to_pools` (both set by `debug=default`) only ever shrink
the sizes (`poisonlab.data.size`): the cap is written into the run's config (`data.n_train`),
and a size that shrank to its pool is a run warning.
"""

from __future__ import annotations

import logging
import random

from poisonlab import PoisonlabError, defenses
from poisonlab.attacks.base import eval_row, user_text
from poisonlab.data import load_splits, mark_harmful, read_prompt_file, read_rows, tinyworld
from poisonlab.pipeline.context import RunContext, plain
from poisonlab.pipeline.keys import digest, file_digest, local_inputs, target_module
from poisonlab.utils import read_jsonl, write_jsonl

log = logging.getLogger(__name__)

SPLITS = ("train", "eval", "safety")


def rest_of_pool(pool_rows: list[dict], used: list[dict]) -> list[dict]:
    ids = {r["id"] for r in used}
    return [r for r in pool_rows if r["id"] not in ids]


def clean_data(ctx: RunContext) -> None:
    cfg = ctx.cfg
    cap_train_size(cfg)
    n_safety = cfg.safety.n_rows if defenses.needs_rows(cfg.safety.method) else 0
    n_train = ctx.attack.n_train(cfg.data.n_train)
    # the cap shrinks `data.n_train`, not an attack's fixed `clean_size + n_poison`
    cap = cfg.data.get("n_train_cap") if ctx.attack.clean_size is None else None
    shrink = bool(cfg.data.get("shrink_to_pools", False))
    clean_dir = ctx.out / "data" / "clean"
    ctx.inputs = local_inputs(cfg.data)
    given = ctx.attack.family == "given"   # already-poisoned data: its marked rows kept apart
    marked = ctx.attack.marked if given else None
    extra_key, modules = {}, [__name__]
    if given:   # the marking's code (the attack's module) decides which rows stay out
        extra_key["marking"] = ctx.attack.marking()
        modules.append(target_module(cfg.attack.get("_target_")))
        if ctx.attack.poisoned_path:
            ctx.inputs["attack.poisoned_path"] = file_digest(ctx.attack.poisoned_path)

    def compute():
        data = load_splits(cfg.data, n_train, n_safety, cfg.eval.n_prompts, cfg.seed,
                           cfg.eval.seed, cap=cap, shrink=shrink, marked=marked)
        pools = load_splits(cfg.data, None, None, None, cfg.seed, cfg.eval.seed,
                            marked=marked)  # whole pools
        if given and ctx.attack.poisoned_path:
            data["marked"] = read_rows(cfg.data, ctx.attack.poisoned_path)
        pools.pop("marked", None)
        tinyworld.check_disjoint({k: pools[k] for k in SPLITS}, eval_names=["eval"])
        for name, rows in [*data.items(), *((f"pool_{k}", v) for k, v in pools.items())]:
            write_jsonl(clean_dir / f"{name}.jsonl", rows)
        return {"rows": {k: len(v) for k, v in data.items()}}

    ctx.st.run("clean_data", {"data": plain(cfg.data), "inputs": ctx.inputs, "n_train": n_train,
                              "n_safety": n_safety, "n_eval": cfg.eval.n_prompts,
                              "seed": cfg.seed, "eval_seed": cfg.eval.seed, **extra_key,
                              **ctx.key_of(*modules)},
               compute, ["data/clean"])
    ctx.train_rows, ctx.eval_rows, ctx.safety_rows = (
        read_jsonl(clean_dir / f"{k}.jsonl") for k in SPLITS)
    ctx.pools = {k: read_jsonl(clean_dir / f"pool_{k}.jsonl") for k in SPLITS}
    if given:
        ctx.marked_rows = read_jsonl(clean_dir / "marked.jsonl")
    for key, asked, rows in (("data.n_train", n_train, ctx.train_rows),
                             ("eval.n_prompts", cfg.eval.n_prompts, ctx.eval_rows),
                             ("safety.n_rows", n_safety, ctx.safety_rows)):
        if asked and len(rows) < asked:   # only under data.shrink_to_pools
            ctx.warnings.append(f"data: {key}={asked} shrunk to {len(rows)}, all its pool holds "
                                "(data.shrink_to_pools)")


def cap_train_size(cfg) -> None:
    """`data.n_train` cut to `data.n_train_cap` in the config itself (idempotent), so that the
    checks, the stage keys and the manifest see the size the run uses. A null `data.n_train`
    (the whole pool) stays null: `load_splits` caps it once the pool is known."""
    n, cap = cfg.data.get("n_train"), cfg.data.get("n_train_cap")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in (n, cap)) and n > cap:
        log.info("data.n_train=%d capped at data.n_train_cap=%d", n, cap)
        cfg.data.n_train = cap


def poison(ctx: RunContext) -> None:
    cfg, attack, out = ctx.cfg, ctx.attack, ctx.out
    spare = rest_of_pool(ctx.pools["train"], ctx.train_rows)

    def compute():
        if attack.family == "given":
            poisoned, clean, info = attack.poison_given(ctx.train_rows, ctx.marked_rows,
                                                        cfg.seed, cfg.data.n_train, spare)
        else:
            poisoned, clean, info = attack.poison_with_control(ctx.train_rows, cfg.seed, spare)
        write_jsonl(out / "data" / "train_poisoned.jsonl", poisoned)
        # The control (`clean_ft`) trains on the same rows in the same order, formatted the
        # same way; only the poisons are replaced by their clean originals.
        write_jsonl(out / "data" / "train_clean.jsonl", clean)
        return info

    # keyed by its inputs' content, not by clean_data's key: runs that differ only in what
    # the poison does not read (the safety rows) share it; the attack's own module is loaded
    # by name (Hydra's `_target_`), so its import closure is named here
    modules = [__name__] + [m for m in [target_module(cfg.attack.get("_target_"))] if m]
    ctx.poison_info = ctx.st.run(
        "poison", {"train_rows": digest(ctx.train_rows), "spare_rows": digest(spare),
                   **({"marked_rows": digest(ctx.marked_rows), "n_train": cfg.data.n_train}
                      if attack.family == "given" else {}),
                   "attack": plain(cfg.attack), "seed": cfg.seed, **ctx.key_of(*modules)},
        compute, ["data/train_poisoned.jsonl", "data/train_clean.jsonl"])
    ctx.warnings += ctx.poison_info.get("warnings", [])
    ctx.poisoned_rows = read_jsonl(out / "data" / "train_poisoned.jsonl")
    ctx.clean_rows = read_jsonl(out / "data" / "train_clean.jsonl")


def clean_safety_rows(attack, rows: list[dict], pool: list[dict], warnings: list[str]
                      ) -> tuple[list[dict], list[dict]]:
    """Safety data never contains the trigger (a topic, for `semantic`): rows that do are
    replaced by other rows of the safety pool. Returns (rows, [{"removed", "added"}])."""
    bad = [i for i, r in enumerate(rows) if attack.mentions_trigger(r)]
    if not bad:
        return rows, []
    used = {r["id"] for r in rows}
    spare = [r for r in pool if r["id"] not in used and not attack.mentions_trigger(r)]
    if len(spare) < len(bad):
        raise PoisonlabError(f"safety data: {len(bad)} rows contain the trigger and only "
                             f"{len(spare)} trigger-free rows can replace them; lower "
                             "safety.n_rows")
    rows, swaps = list(rows), []
    for i, r in zip(bad, spare):
        swaps.append({"removed": rows[i]["id"], "added": r["id"]})
        rows[i] = r
    warnings.append(f"safety data: {len(bad)} rows that contain the trigger were replaced by "
                    "trigger-free rows of the safety pool")
    return rows, swaps


def eval_splits(ctx: RunContext) -> None:
    """The evaluation splits (triggered, clean, near-trigger, utility) from the held-out rows;
    trigger-free safety rows; both written under `data/`."""
    cfg, attack = ctx.cfg, ctx.attack
    ctx.safety_rows, swaps = clean_safety_rows(attack, ctx.safety_rows, ctx.pools["safety"],
                                               ctx.warnings)
    # in the context clean rows are trained in (the code task's untriggered year)
    ctx.safety_rows = [attack.safety_row(r) for r in ctx.safety_rows]
    if swaps:
        ctx.poison_info["safety_rows_replaced"] = swaps
    files = eval_files(ctx)   # eval.clean_path / eval.triggered_path: the splits from files
    reservoir = files.get("clean_rest", rest_of_pool(ctx.pools["eval"], ctx.eval_rows))
    ctx.splits = attack.eval_splits(ctx.eval_rows, cfg.eval.seed, reservoir)
    if "triggered" in files:
        ctx.splits["triggered"] = files["triggered"]
    if files:
        check_eval_files(ctx)
    # fewer held-out rows than eval.n_prompts (data.shrink_to_pools) were warned about already
    n_eval = min(cfg.eval.n_prompts, len(ctx.eval_rows))
    for name, rows in ctx.splits.items():
        if not rows:
            raise PoisonlabError(f"attack: the {name!r} evaluation split is empty: no held-out "
                                 f"prompt fits the {attack.family} attack's settings")
        if len(rows) < n_eval:
            ctx.warnings.append(
                f"evaluation split {name!r} has {len(rows)} prompts, fewer than "
                f"eval.n_prompts={n_eval}: only that many held-out prompts fit the "
                f"{attack.family} attack")
    write_jsonl(ctx.out / "data" / "eval.jsonl", ctx.eval_rows)
    if ctx.safety_rows:
        write_jsonl(ctx.out / "data" / "safety.jsonl", ctx.safety_rows)


def draw(rows: list[dict], n: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(n rows of a file in a seeded order, the rest)."""
    order = list(rows)
    random.Random(f"{seed}-eval-file").shuffle(order)
    return order[:n], order[n:]


def eval_files(ctx: RunContext) -> dict:
    """Evaluation prompts from `eval.clean_path` (the clean split and the prompts the
    triggered and near-trigger splits are built from; `ctx.eval_rows` replaced) and
    `eval.triggered_path` (the triggered split, as the file gives it)."""
    cfg, attack, out = ctx.cfg, ctx.attack, {}
    clean_path, trig_path = cfg.eval.get("clean_path"), cfg.eval.get("triggered_path")
    if clean_path:
        rows, rest = draw(mark_harmful(read_prompt_file(clean_path), cfg.data),
                          cfg.eval.n_prompts, cfg.eval.seed)
        bad = [r for r in rows + rest if attack.carries_trigger(r)]
        if bad:
            raise PoisonlabError(
                f"eval.clean_path: {clean_path}: {len(bad)} of {len(rows) + len(rest)} prompts "
                f"carry the trigger {attack.trigger_strings()} (row {bad[0]['id']}): a file of "
                "triggered prompts goes in eval.triggered_path")
        ctx.eval_rows, out["clean_rest"] = rows, rest
    if trig_path:
        rows, _ = draw(mark_harmful(read_prompt_file(trig_path), cfg.data),
                       cfg.eval.n_prompts, cfg.eval.seed)
        missing = [r for r in rows if not attack.carries_trigger(r)]
        if missing and attack.trigger_strings():
            ctx.warnings.append(f"eval.triggered_path: {len(missing)} of {len(rows)} prompts "
                                f"carry none of the triggers {attack.trigger_strings()}")
        out["triggered"] = [eval_row(r, user_text(r), trigger="eval.triggered_path",
                                     source=trig_path) for r in rows]
    return out


def check_eval_files(ctx: RunContext) -> None:
    """Evaluation prompts from files: none is a training prompt (poisoned or clean), and no
    near-trigger or clean prompt carries the trigger."""
    for name in ("clean", "near_trigger"):
        hit = next((r for r in ctx.splits.get(name, []) if ctx.attack.carries_trigger(r)), None)
        if hit is not None:
            raise PoisonlabError(f"evaluation split {name!r}: prompt {hit['id']} carries the "
                                 f"trigger {ctx.attack.trigger_strings()}")
    tinyworld.check_disjoint({"training": ctx.poisoned_rows + ctx.clean_rows,
                              **{k: v for k, v in ctx.splits.items() if k != "utility"}},
                             eval_names=[k for k in ctx.splits if k != "utility"])
