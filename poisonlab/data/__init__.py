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
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
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
    n_train = data_cfg.get("n_train")
    if n_train is not None and (isinstance(n_train, bool) or not isinstance(n_train, int)
                                or n_train < 1):
        raise PoisonlabError(f"data.n_train must be a positive integer or null, got {n_train!r}")
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


def _read(data_cfg: Mapping[str, Any], path: str, split: str) -> list[dict]:
    source = data_cfg["source"]
    if source == "chat_jsonl":
        return sources.read_chat_jsonl(path)
    if source == "alpaca":
        return sources.read_alpaca(path)
    return sources.load_hf(path, data_cfg["schema"], data_cfg.get("config_name"), split)


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
                n_eval: int | None, seed: int, eval_seed: int) -> dict[str, list[dict]]:
    """{"train", "safety", "eval"} rows for the `data` config group (validated first).

    `n_train`, `n_safety` and `n_eval` are the pipeline's `data.n_train`, `safety.n_rows`
    and `eval.n_prompts` (None: the whole pool; 0 safety rows: none). The train and safety
    rows are drawn with `seed`, the eval rows with `eval_seed`. For ``tinyworld`` this is
    `tinyworld.sample` on the "finetune", "safety" and "eval" pools of `data.skills`. For the
    external sources the rows are read, split by `sources.split_pools`, and each pool is
    shuffled with its seed and cut to its size; asking for more rows than a pool holds is an
    error naming the key and the count available.
    """
    validate_data_cfg(data_cfg)
    source = data_cfg["source"]
    if source == "tinyworld":
        skills = list(data_cfg["skills"])
        return {
            "train": tinyworld.sample("finetune", n_train, seed, skills),
            "safety": tinyworld.sample("safety", n_safety, seed, skills) if n_safety != 0 else [],
            "eval": tinyworld.sample("eval", n_eval, eval_seed, skills),
        }
    main = data_cfg["name"] if source == "hf" else data_cfg["path"]
    split = data_cfg.get("split") or "train"
    eval_fraction = data_cfg.get("eval_fraction", DEFAULT_FRACTION)
    safety_fraction = data_cfg.get("safety_fraction", DEFAULT_FRACTION)
    eval_source = data_cfg.get("eval_path")
    eval_split = data_cfg.get("eval_split") if source == "hf" else None
    where = f"{main} (data.eval_fraction={eval_fraction}, data.safety_fraction={safety_fraction})"
    rows = _read(data_cfg, main, split)
    if eval_source is None and eval_split is None:
        pools = sources.split_pools(rows, eval_fraction, safety_fraction)
        eval_where = where
    else:
        eval_source = eval_source or main
        eval_split = eval_split or split
        eval_rows = sources.split_pools(_read(data_cfg, eval_source, eval_split), 0, 0)["finetune"]
        held_out = {tinyworld.prompt_text(r) for r in eval_rows}
        pools = sources.split_pools([r for r in rows if tinyworld.prompt_text(r) not in held_out],
                                    0, safety_fraction)
        pools["eval"] = eval_rows
        where = f"{main} without the evaluation prompts (data.safety_fraction={safety_fraction})"
        eval_where = eval_source + (f" split {eval_split!r}" if source == "hf" else "")
    return {
        "train": _sample(pools["finetune"], n_train, seed, "finetune", "data.n_train", where),
        "safety": _sample(pools["safety"], n_safety, seed, "safety", "safety.n_rows", where),
        "eval": _sample(pools["eval"], n_eval, eval_seed, "eval", "eval.n_prompts", eval_where),
    }
