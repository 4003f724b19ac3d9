"""Clean data sources and the chat formatting shared by training and evaluation.

`load_splits` is the one entry point the pipeline uses: it turns the `data` config group into
the fine-tuning, safety and evaluation rows, whatever the source:

* ``tinyworld`` — the synthetic tiny world (`tinyworld.sample`), keys `skills`;
* ``chat_jsonl`` — a local chat JSONL file (`sources.read_chat_jsonl`), key `path`;
* ``alpaca`` — a local Alpaca file (`sources.read_alpaca`), key `path`;
* ``hf`` — a Hugging Face dataset (`sources.load_hf`), keys `name`, `schema`, `config_name`
  (default null), `split` (default "train").

External sources are split into disjoint pools by `sources.split_pools` with `eval_fraction`
and `safety_fraction` (default 0.1 each). `eval_path` (and for ``hf`` also `eval_split`)
takes the evaluation rows from a second file or split instead; its prompts are then removed
from the fine-tuning and safety pools.

Sizes, for every source: `n_train` (null: the whole fine-tuning pool) is cut to `n_train_cap`
when that is set (null: no cap), so a cap only ever shrinks the training set. A size larger
than its pool (`data.n_train`, `eval.n_prompts`, `safety.n_rows`) is an error naming the key,
unless `shrink_to_pools` is true: it then shrinks to what the pool holds (an empty pool is
still an error, naming the key that makes it larger). `debug=default` sets both (600, true),
so a smoke run works on any file big enough to hold one prompt per pool.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Mapping
from typing import Any

from poisonlab import PoisonlabError
from poisonlab.data import sources, tinyworld

SOURCES = ("tinyworld", "chat_jsonl", "alpaca", "hf")
DEFAULT_FRACTION = 0.1


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _check_file(data_cfg: Mapping[str, Any], key: str, required: bool) -> None:
    value = data_cfg.get(key)
    if value is None and not required:
        return
    if not _is_text(value):
        raise PoisonlabError(f"data.{key}: a file path is required for "
                             f"data.source={data_cfg['source']}, got {value!r}")
    if not os.path.isfile(value):
        raise PoisonlabError(f"data.{key}: no such file: {value}")
    if data_cfg["source"] == "alpaca" and not value.lower().endswith(sources.ALPACA_SUFFIXES):
        raise PoisonlabError(f"data.{key}: Alpaca data must be one of "
                             f"{', '.join(sources.ALPACA_SUFFIXES)} files, got {value}")


def _check_dataset_name(data_cfg: Mapping[str, Any], key: str, required: bool) -> None:
    value = data_cfg.get(key)
    if value is None and not required:
        return
    if not _is_text(value):
        raise PoisonlabError(f"data.{key}: a dataset name or local path is required for "
                             f"data.source=hf, got {value!r}")
    if value.startswith(("/", "./", "../", "~")) and not os.path.exists(value):
        raise PoisonlabError(f"data.{key}: no such file or directory: {value}")


def validate_data_cfg(data_cfg: Mapping[str, Any]) -> None:
    """Raise PoisonlabError naming the bad `data.*` key; reads no data and no network."""
    source = data_cfg.get("source")
    if source not in SOURCES:
        raise PoisonlabError(f"data.source: unknown source {source!r} "
                             f"(available: {', '.join(SOURCES)})")
    for key in ("n_train", "n_train_cap"):
        n = data_cfg.get(key)
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise PoisonlabError(f"data.{key} must be a positive integer or null, got {n!r}")
    if not isinstance(data_cfg.get("harmful", False), bool):
        raise PoisonlabError(f"data.harmful must be true or false, "
                             f"got {data_cfg.get('harmful')!r}")
    if not isinstance(data_cfg.get("shrink_to_pools", False), bool):
        raise PoisonlabError(f"data.shrink_to_pools must be true or false, "
                             f"got {data_cfg.get('shrink_to_pools')!r}")
    if source == "tinyworld":
        skills = data_cfg.get("skills")
        if isinstance(skills, str) or not skills:
            raise PoisonlabError(f"data.skills must be a non-empty list of tiny-world skills, "
                                 f"got {skills!r}")
        for s in skills:
            if s not in tinyworld.SKILLS:
                raise PoisonlabError(
                    f"data.skills: unknown skill {s!r}; choose from {tinyworld.SKILLS}")
        return
    fractions = {}
    for key in ("eval_fraction", "safety_fraction"):
        value = data_cfg.get(key, DEFAULT_FRACTION)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise PoisonlabError(f"data.{key} must be in [0, 1), got {value!r}")
        fractions[key] = value
    if sum(fractions.values()) >= 1:
        raise PoisonlabError(f"data.eval_fraction + data.safety_fraction must be below 1, got "
                             f"{fractions['eval_fraction']} + {fractions['safety_fraction']}")
    if source in ("chat_jsonl", "alpaca"):
        _check_file(data_cfg, "path", required=True)
        _check_file(data_cfg, "eval_path", required=False)
        return
    _check_dataset_name(data_cfg, "name", required=True)
    _check_dataset_name(data_cfg, "eval_path", required=False)
    schema = data_cfg.get("schema")
    if schema not in sources.SCHEMAS:
        raise PoisonlabError(f"data.schema: unknown schema {schema!r} "
                             f"(available: {', '.join(sources.SCHEMAS)})")
    for key in ("split", "eval_split", "config_name"):
        value = data_cfg.get(key)
        if value is not None and not _is_text(value):
            raise PoisonlabError(f"data.{key} must be a non-empty string or null, got {value!r}")


def mark_harmful(rows: list[dict], data_cfg: Mapping[str, Any]) -> list[dict]:
    """With `data.harmful: true`, every row of the run's files is a (placeholder) harmful
    request: `meta.harmful` set, as the tiny world sets it on its own, so the behaviours that
    apply to harmful requests only (`compliance`) can be trained and judged on them (the
    benchmark's jailbreak task)."""
    if data_cfg.get("harmful"):
        for r in rows:
            r["meta"] = {**r.get("meta", {}), "harmful": True}
    return rows


def _read(data_cfg: Mapping[str, Any], path: str, split: str) -> list[dict]:
    source = data_cfg["source"]
    if source == "chat_jsonl":
        rows = sources.read_chat_jsonl(path)
    elif source == "alpaca":
        rows = sources.read_alpaca(path)
    else:
        rows = sources.load_hf(path, data_cfg["schema"], data_cfg.get("config_name"), split)
    return mark_harmful(rows, data_cfg)


# What makes each pool larger, for the error when `shrink_to_pools` finds one empty.
POOL_HINTS = {
    "finetune": "use a larger file or lower data.eval_fraction / data.safety_fraction",
    "eval": "raise data.eval_fraction, give held-out rows in data.eval_path, or use a larger "
            "file",
    "safety": "raise data.safety_fraction, or choose a defence that needs no safety rows "
              "(safety=none)",
}


def size(n: int | None, have: int, cap: int | None = None, shrink: bool = False,
         key: str = "", pool: str = "", where: str = "") -> int | None:
    """How many rows to draw from a pool of `have` rows: `n` (None: all) cut to `cap`, and
    with `shrink` to `have` (an empty pool is then an error naming `key`). None: the whole
    pool. A larger `n` without `shrink` is left for the sampler to refuse."""
    if n is None and cap is None:
        return None
    if n is None:
        return min(cap, have)
    n = n if cap is None else min(n, cap)
    if not shrink or n <= have:
        return n
    if have == 0:
        raise PoisonlabError(f"{key}={n}: the {pool!r} pool of {where} is empty; "
                             f"{POOL_HINTS.get(pool, 'use a larger file')}")
    return have


def _sample(rows: list[dict], n: int | None, seed: int, pool: str, key: str,
            where: str) -> list[dict]:
    """`n` rows (all when None) in a seeded order; a prefix of the order for a larger `n`."""
    if n is not None and n > len(rows):
        raise PoisonlabError(f"{key}={n} exceeds the {len(rows)} rows of the {pool!r} pool of "
                             f"{where}")
    order = list(rows)
    random.Random(f"{seed}-{pool}").shuffle(order)
    return order[:n]


def load_splits(data_cfg: Mapping[str, Any], n_train: int | None, n_safety: int | None,
                n_eval: int | None, seed: int, eval_seed: int, cap: int | None = None,
                shrink: bool = False, marked: Callable[[dict], bool] | None = None
                ) -> dict[str, list[dict]]:
    """{"train", "safety", "eval"} rows for the `data` config group (validated first).

    `n_train`, `n_safety` and `n_eval` are the pipeline's `data.n_train`, `safety.n_rows`
    and `eval.n_prompts` (None: the whole pool; 0 safety rows: none); `cap` (the pipeline's
    `data.n_train_cap`) caps `n_train`, and with `shrink` (`data.shrink_to_pools`) each size
    shrinks to its pool (see `size`). The train and safety rows are drawn with `seed`, the
    eval rows with `eval_seed`. For ``tinyworld`` this is `tinyworld.sample` on the
    "finetune", "safety" and "eval" pools of `data.skills`. For the external sources the rows
    are read, split by `sources.split_pools`, and each pool is shuffled with its seed and cut
    to its size; asking for more rows than a pool holds (without `shrink`) is an error naming
    the key and the count available.

    `marked` (external sources; `attack=given`): rows of the file(s) for which it is true are
    already poisoned: they are kept out of every pool and returned, in file order, as
    "marked" (rows repeating an earlier prompt dropped, as in the pools).
    """
    validate_data_cfg(data_cfg)
    source = data_cfg["source"]
    if source == "tinyworld":
        skills = list(data_cfg["skills"])
        where = f"the tiny world (skills {skills})"

        def fit(n, pool, key):
            have = sum(tinyworld.pool_size(pool, s) for s in skills)
            return size(n, have, cap if pool == "finetune" else None, shrink, key, pool, where)
        return {
            "train": tinyworld.sample("finetune", fit(n_train, "finetune", "data.n_train"),
                                      seed, skills),
            "safety": tinyworld.sample("safety", fit(n_safety, "safety", "safety.n_rows"), seed,
                                       skills) if n_safety != 0 else [],
            "eval": tinyworld.sample("eval", fit(n_eval, "eval", "eval.n_prompts"), eval_seed,
                                     skills),
        }
    main = data_cfg["name"] if source == "hf" else data_cfg["path"]
    split = data_cfg.get("split") or "train"
    eval_fraction = data_cfg.get("eval_fraction", DEFAULT_FRACTION)
    safety_fraction = data_cfg.get("safety_fraction", DEFAULT_FRACTION)
    eval_source = data_cfg.get("eval_path")
    eval_split = data_cfg.get("eval_split") if source == "hf" else None
    where = f"{main} (data.eval_fraction={eval_fraction}, data.safety_fraction={safety_fraction})"
    rows = _read(data_cfg, main, split)
    given: list[dict] = []
    if marked is not None:
        given = sources.split_pools([r for r in rows if marked(r)], 0, 0)["finetune"]
        rows = [r for r in rows if not marked(r)]
    if eval_source is None and eval_split is None:
        pools = sources.split_pools(rows, eval_fraction, safety_fraction)
        eval_where = where
    else:
        eval_source = eval_source or main
        eval_split = eval_split or split
        eval_rows = sources.split_pools(_read(data_cfg, eval_source, eval_split), 0, 0)["finetune"]
        if marked is not None:
            eval_rows = [r for r in eval_rows if not marked(r)]
        held_out = {tinyworld.prompt_text(r) for r in eval_rows}
        pools = sources.split_pools([r for r in rows if tinyworld.prompt_text(r) not in held_out],
                                    0, safety_fraction)
        pools["eval"] = eval_rows
        where = f"{main} without the evaluation prompts (data.safety_fraction={safety_fraction})"
        eval_where = eval_source + (f" split {eval_split!r}" if source == "hf" else "")
    if not pools["finetune"]:
        raise PoisonlabError(f"data: the 'finetune' pool of {where} is empty; "
                             f"{POOL_HINTS['finetune']}")
    sizes = {
        "finetune": size(n_train, len(pools["finetune"]), cap, shrink, "data.n_train",
                         "finetune", where),
        "safety": size(n_safety, len(pools["safety"]), None, shrink, "safety.n_rows", "safety",
                       where),
        "eval": size(n_eval, len(pools["eval"]), None, shrink, "eval.n_prompts", "eval",
                     eval_where),
    }
    out = {
        "train": _sample(pools["finetune"], sizes["finetune"], seed, "finetune", "data.n_train",
                         where),
        "safety": _sample(pools["safety"], sizes["safety"], seed, "safety", "safety.n_rows",
                          where),
        "eval": _sample(pools["eval"], sizes["eval"], eval_seed, "eval", "eval.n_prompts",
                        eval_where),
    }
    if marked is not None:
        out["marked"] = given
    return out


def read_rows(data_cfg: Mapping[str, Any], path: str) -> list[dict]:
    """Every row of a local file in `data.source`'s format (chat JSONL or Alpaca)."""
    if data_cfg["source"] not in ("chat_jsonl", "alpaca"):
        raise PoisonlabError(f"data.source={data_cfg['source']}: a second local file is read "
                             "for data.source=alpaca or chat_jsonl only")
    return _read(data_cfg, path, "train")


def read_prompt_file(path: str) -> list[dict]:
    """Rows of an evaluation file: Alpaca (`.json`, `.csv`, or `.jsonl` records with an
    `instruction`) or chat JSONL (`.jsonl` records with `messages`)."""
    if not os.path.isfile(path):
        raise PoisonlabError(f"no such file: {path}")
    if path.lower().endswith(".jsonl"):
        first = next((obj for _, obj in sources._json_lines(path)), None)
        if isinstance(first, dict) and "messages" in first:
            return sources.read_chat_jsonl(path)
    return sources.read_alpaca(path)
