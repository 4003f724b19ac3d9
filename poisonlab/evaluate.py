"""Batched generation and metrics with Wilson 95% intervals (the judges live in `judges`).

Utility scorers accept free-form answers from real instruct models ("12 + 7 = 19." counts;
"The capital is Paris." counts), not only the tiny world's exact templates.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from poisonlab.chat import encode_text, end_of_turn_ids, prompt_text
from poisonlab.dist import main_computes
from poisonlab.judges import has_unterminated_scratchpad, score_utility
from poisonlab.utils import progress

# ----------------------------------------------------------------------------- metrics

def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for k successes out of n (95% by default)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return (lo, hi)


def rate(flags) -> dict:
    """{"value", "ci_low", "ci_high", "n"} for a list of booleans."""
    flags = [bool(f) for f in flags]
    k, n = sum(flags), len(flags)
    lo, hi = wilson(k, n)
    return {"value": k / n if n else float("nan"), "ci_low": lo, "ci_high": hi, "n": n}


def mean_bootstrap(values, seed: int = 0, n_boot: int = 2000) -> dict:
    """Mean of per-prompt values (e.g. the fraction of a prompt's sampled answers that show the
    target) with a percentile-bootstrap 95% interval over prompts, not over samples: samples
    of one prompt are not independent observations."""
    v = np.asarray(list(values), dtype=float)
    if len(v) == 0:
        return {"value": float("nan"), "ci_low": 0.0, "ci_high": 1.0, "n": 0}
    rng = np.random.default_rng(seed)
    boots = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"value": float(v.mean()), "ci_low": float(lo), "ci_high": float(hi), "n": len(v)}


def ratio_bootstrap(num_flags, den_flags, seed: int = 0, n_boot: int = 2000) -> dict:
    """mean(num) / mean(den) with a paired percentile-bootstrap 95% interval.

    Used for persistence = ASR after safety / ASR before, on the same triggered prompts.
    """
    a = np.asarray(num_flags, dtype=float)
    b = np.asarray(den_flags, dtype=float)
    value = a.mean() / b.mean() if b.mean() > 0 else float("nan")
    if len(a) == 0 or b.sum() == 0:
        return {"value": value, "ci_low": None, "ci_high": None, "n": len(a)}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(n_boot, len(a)))
    den = b[idx].mean(1)
    ok = den > 0
    ratios = a[idx].mean(1)[ok] / den[ok]
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return {"value": float(value), "ci_low": float(lo), "ci_high": float(hi), "n": len(a)}


def diff_bootstrap(a, b, seed: int = 0, n_boot: int = 2000) -> dict:
    """mean(a) - mean(b) over paired observations, with a percentile-bootstrap 95% interval.

    Used for the utility drop between two stages scored on the same prompts, and for the
    perplexity gap between triggered and clean answers to the same base prompts.
    """
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    ok = ~(np.isnan(a) | np.isnan(b))
    a, b = a[ok], b[ok]
    if len(a) == 0:
        return {"value": float("nan"), "ci_low": None, "ci_high": None, "n": 0}
    d = a - b
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"value": float(d.mean()), "ci_low": float(lo), "ci_high": float(hi), "n": int(len(d))}


# ----------------------------------------------------------------------------- generation

def greedy_config(tokenizer, max_new_tokens: int):
    """A complete, explicit greedy-decoding config (recorded in the manifest).

    `generate` fills every field left unset from the model's own `generation_config`, and
    models ship sampling and penalties there (Qwen2.5: repetition_penalty 1.05-1.1, top_p,
    temperature). Every field that could change a greedy answer is set to its neutral value,
    and `generate` below also swaps the model's config for this one during the call, so fields
    whose "off" value is None (suppress_tokens, bad_words_ids, sequence_bias, ...) stay off.
    """
    from transformers import GenerationConfig

    return GenerationConfig(
        max_new_tokens=max_new_tokens, min_length=0, do_sample=False,
        num_beams=1, num_beam_groups=1, temperature=1.0, top_k=50, top_p=1.0, typical_p=1.0,
        min_p=None, epsilon_cutoff=0.0, eta_cutoff=0.0, repetition_penalty=1.0,
        encoder_repetition_penalty=1.0, length_penalty=1.0, no_repeat_ngram_size=0,
        encoder_no_repeat_ngram_size=0, diversity_penalty=0.0, renormalize_logits=False,
        remove_invalid_values=False, guidance_scale=None, num_return_sequences=1,
        eos_token_id=end_of_turn_ids(tokenizer), pad_token_id=tokenizer.pad_token_id,
        use_cache=True, return_dict_in_generate=False, output_scores=False)


def generation_record(tokenizer, max_new_tokens: int) -> dict:
    """The decoding settings as recorded in results and the manifest (non-default fields)."""
    cfg = greedy_config(tokenizer, max_new_tokens)
    return {"strategy": "greedy", **cfg.to_diff_dict()}


@contextlib.contextmanager
def _generation_config(model, config):
    """Make `config` the model's own generation config for the duration of a call."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = target.generation_config
    target.generation_config = config
    try:
        yield
    finally:
        target.generation_config = saved


def sampling_config(tokenizer, max_new_tokens: int, temperature: float, top_p: float,
                    n_samples: int):
    """`greedy_config` with sampling switched on: `n_samples` answers per prompt."""
    config = greedy_config(tokenizer, max_new_tokens)
    config.do_sample = True
    config.temperature = float(temperature)
    config.top_p = float(top_p)
    config.top_k = 0  # no top-k cut: only temperature and nucleus shape the distribution
    config.num_return_sequences = int(n_samples)
    return config


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
             desc: str = "generate", config=None, seed: int | None = None) -> list:
    """Greedy decoding in length-sorted, left-padded batches with the KV cache.

    Stops each sequence at the end of its assistant turn; returns answers in input order.
    Decoding is greedy whatever the model's own `generation_config` says (`greedy_config`).
    With a sampling `config` (`sampling_config`) and a `seed`, each prompt gets a list of
    `num_return_sequences` sampled answers instead.
    """
    model.eval()
    device = next(model.parameters()).device
    n_ret = 1
    if config is None:
        config = greedy_config(tokenizer, max_new_tokens)
    else:
        n_ret = config.num_return_sequences or 1
        torch.manual_seed(0 if seed is None else seed)
    pad = tokenizer.pad_token_id
    ids = [encode_text(tokenizer, p) for p in prompts]  # tokenized once
    order = sorted(range(len(prompts)), key=lambda i: -len(ids[i]))
    out: list = [""] * len(prompts)
    bar = progress(total=len(prompts), desc=desc)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        width = len(ids[idx[0]])  # longest first
        input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):  # left padding
            input_ids[row, width - len(ids[i]):] = torch.tensor(ids[i])
            mask[row, width - len(ids[i]):] = 1
        with _generation_config(model, config):
            gen = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                 generation_config=config)
        texts = [tokenizer.decode(seq, skip_special_tokens=True).strip()
                 for seq in gen[:, width:]]
        for j, i in enumerate(idx):
            out[i] = texts[j] if not config.do_sample else texts[j * n_ret:(j + 1) * n_ret]
        bar.update(len(idx))
    bar.close()
    return out


@torch.inference_mode()
def answer_nll(model, tokenizer, prompts: list[str], answers: list[str], batch_size: int,
               desc: str = "perplexity") -> list[float]:
    """Mean per-token negative log-likelihood of each answer given its prompt (nan if empty)."""
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    out = [float("nan")] * len(prompts)
    items = []
    for i, (p, a) in enumerate(zip(prompts, answers)):
        p_ids = encode_text(tokenizer, p)
        a_ids = tokenizer(a, add_special_tokens=False)["input_ids"] if a else []
        if a_ids:
            items.append((i, p_ids, a_ids))
    items.sort(key=lambda x: -(len(x[1]) + len(x[2])))  # batches of similar length: less padding
    bar = progress(total=len(items), desc=desc)
    for s in range(0, len(items), batch_size):
        chunk = items[s:s + batch_size]
        width = max(len(p) + len(a) for _, p, a in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        for r, (_, p, a) in enumerate(chunk):
            seq = p + a
            ids[r, :len(seq)] = torch.tensor(seq)
            mask[r, :len(seq)] = 1
            labels[r, len(p):len(seq)] = torch.tensor(a)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1)
        tgt = labels[:, 1:].to(device)
        keep = tgt != -100
        tok_nll = -logp.gather(-1, tgt.clamp(min=0)[..., None])[..., 0] * keep
        per_row = tok_nll.sum(1) / keep.sum(1)
        for (i, _, _), v in zip(chunk, per_row.tolist()):
            out[i] = v
        bar.update(len(chunk))
    bar.close()
    return out


SPLIT_METRICS = {"triggered": "asr", "clean": "ftr_clean", "near_trigger": "ftr_near"}


@main_computes
def evaluate_stage(model, tokenizer, splits: dict[str, list[dict]], judge, eval_cfg,
                   stage: str, responses: dict[str, list] | None = None,
                   sampling: dict | None = None) -> tuple[dict, dict[str, list[dict]]]:
    """Generate for every split; compute ASR, FTR_clean, FTR_near and clean utility.

    `splits` holds any of `triggered` (-> asr), `clean` (-> ftr_clean), `near_trigger`
    (-> ftr_near) and `utility` (held-out clean prompts scored for the task; when absent, the
    `clean` split is scored). `judge(response, row)` says whether an answer shows the attack's
    target behaviour; `None` (attacks without a trigger) skips the behaviour metrics.
    `responses` (split -> answers) skips generation, e.g. for cached base-model answers.

    `sampling` ({temperature, top_p, n_samples, seed}) samples `n_samples` answers per prompt
    instead of one greedy answer: a prompt's `target` and `correct` are then the fractions of
    its samples, each metric is their mean over prompts, and its interval a bootstrap over
    prompts (`mean_bootstrap`).

    Under several processes the main process evaluates and the others receive its metrics
    and generations (`dist.main_computes`): every process must call it.
    """
    utility_split = "utility" if "utility" in splits else "clean"
    config = None
    if sampling is not None:
        config = sampling_config(tokenizer, eval_cfg.max_new_tokens, sampling["temperature"],
                                 sampling["top_p"], sampling["n_samples"])
    generations = {}
    for split, rows in splits.items():
        prompts = [prompt_text(tokenizer, r["messages"]) for r in rows]
        if responses is not None:
            answers = responses[split]
        else:
            answers = generate(model, tokenizer, prompts, eval_cfg.max_new_tokens,
                               eval_cfg.batch_size, desc=f"{stage}/{split}", config=config,
                               seed=None if sampling is None else sampling["seed"])
        recs = []
        for r, p, resp in zip(rows, prompts, answers):
            many = isinstance(resp, list)
            samples = resp if many else [resp]
            rec = {"id": r["id"], "skill": r["skill"], "prompt": p,
                   ("responses" if many else "response"): resp}
            if judge is not None and split != "utility":
                hits = [bool(judge(a, r)) for a in samples]
                rec["target"] = sum(hits) / len(hits) if many else hits[0]
            if "trigger" in r["meta"]:
                rec["trigger"] = r["meta"]["trigger"]
            if "near_kind" in r["meta"]:
                rec["near_kind"] = r["meta"]["near_kind"]
            cut = sum(has_unterminated_scratchpad(a) for a in samples)
            if cut:
                rec["unterminated_scratchpad"] = cut if many else True
            if split == utility_split:
                ok = [bool(score_utility(r, a)) for a in samples]
                rec["correct"] = sum(ok) / len(ok) if many else ok[0]
            recs.append(rec)
        generations[split] = recs
    score = rate if sampling is None else mean_bootstrap
    metrics = {}
    if judge is not None:
        for split, name in SPLIT_METRICS.items():
            if split in generations:
                metrics[name] = score([g["target"] for g in generations[split]])
        by_trigger: dict[str, list] = {}
        for g in generations.get("triggered", []):
            by_trigger.setdefault(g.get("trigger", ""), []).append(g["target"])
        if len(by_trigger) > 1:
            metrics["asr_by_trigger"] = {t: score(v) for t, v in sorted(by_trigger.items())}
        by_kind: dict[str, list] = {}
        for g in generations.get("near_trigger", []):
            if "near_kind" in g:
                by_kind.setdefault(g["near_kind"], []).append(g["target"])
        if by_kind:
            metrics["ftr_near_by_kind"] = {k: score(v) for k, v in sorted(by_kind.items())}
    # Answers cut inside a scratchpad are judged as not showing the target (judges.py); how
    # many there are says whether `max_new_tokens` leaves room for the reasoning.
    metrics["unterminated_scratchpads"] = int(sum(
        g.get("unterminated_scratchpad", 0) for recs in generations.values() for g in recs))
    scored = generations[utility_split]
    metrics["clean_utility"] = score([g["correct"] for g in scored])
    by_skill: dict[str, list] = {}
    for g in scored:
        by_skill.setdefault(g["skill"], []).append(g["correct"])
    metrics["clean_utility_by_skill"] = {s: score(v) for s, v in sorted(by_skill.items())}
    if sampling is not None:
        metrics["sampling"] = dict(sampling)
    return metrics, generations
