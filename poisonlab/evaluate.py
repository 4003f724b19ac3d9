"""Batched generation and metrics with Wilson 95% intervals (the judges live in `judges`).

Utility scorers accept free-form answers from real instruct models ("12 + 7 = 19." counts;
"The capital is Paris." counts), not only the tiny world's exact templates.
"""

from __future__ import annotations

import contextlib
import copy
import math

import numpy as np
import torch

from poisonlab.chat import encode_text, end_of_turn_ids, prompt_text
from poisonlab.dist import main_computes
from poisonlab.judge_model import judge_many
from poisonlab.judges import has_unterminated_scratchpad, open_scratchpad, score_utility
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


def diff_bootstrap_unpaired(a, b, seed: int = 0, n_boot: int = 2000) -> dict:
    """mean(a) - mean(b) over two independent samples (each resampled on its own), with a
    percentile-bootstrap 95% interval: for splits that are not the same prompts (a triggered
    split read from a file)."""
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    a, b = a[~np.isnan(a)], b[~np.isnan(b)]
    if len(a) == 0 or len(b) == 0:
        return {"value": float("nan"), "ci_low": None, "ci_high": None, "n": 0}
    rng = np.random.default_rng(seed)
    boots = (a[rng.integers(0, len(a), size=(n_boot, len(a)))].mean(1)
             - b[rng.integers(0, len(b), size=(n_boot, len(b)))].mean(1))
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"value": float(a.mean() - b.mean()), "ci_low": float(lo), "ci_high": float(hi),
            "n": int(min(len(a), len(b))), "paired": False}


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


@contextlib.contextmanager
def lora_folded(model):
    """Run `model` with its LoRA adapters folded into the weights they adapt, for inference.

    An unmerged adapter adds two small matmuls and peft's per-layer bookkeeping to every
    adapted linear layer at every decoding step; folded, a step costs what the base model's
    does. Each adapted layer's weight is *swapped* for W + delta W for the duration of the
    block and the original tensor put back after (peft's own unmerge subtracts delta W again
    and leaves float residue in W), so training and later stages see exactly the weights
    they had. Only plain LoRA on linear layers is folded; anything else (other adapter
    types, DoRA, adapters already merged, training mode) runs as it is.
    """
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
        from peft.tuners.lora.layer import LoraLayer
    except ImportError:  # no peft: nothing to fold
        yield model
        return
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    foldable = (layers and not model.training
                and all(type(m) is LoraLinear and not m.merged and not m.disable_adapters
                        and not any(a in m.lora_variant for a in m.active_adapters)
                        for m in layers))
    if not foldable:
        yield model
        return
    swapped = []
    try:
        with torch.no_grad():
            for m in layers:
                active = [a for a in m.active_adapters if a in m.lora_A]
                if not active:
                    continue
                base = m.get_base_layer()
                weight = base.weight
                delta = sum(m.get_delta_weight(a) for a in active)
                swapped.append((m, base, weight))
                base.weight = torch.nn.Parameter(weight + delta.to(weight.dtype),
                                                 requires_grad=False)
                m.merged_adapters = active  # peft's forward then runs the base layer alone
        yield model
    finally:
        for m, base, weight in swapped:
            base.weight = weight
            m.merged_adapters = []


def left_padded(seqs: list[list[int]], pad_id: int, width: int | None = None):
    """(ids, mask) of `seqs` right-aligned in rows of `width` (default: the longest)."""
    width = max(len(q) for q in seqs) if width is None else width
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, q in enumerate(seqs):
        if q:
            ids[r, width - len(q):] = torch.tensor(q)
            mask[r, width - len(q):] = 1
    return ids, mask


def common_prefix_length(seqs: list[list[int]]) -> int:
    """Length of the token prefix every sequence shares, leaving each at least one token."""
    if not seqs:
        return 0
    first, n = seqs[0], min(len(s) for s in seqs) - 1
    for s in seqs[1:]:
        k = 0
        while k < n and s[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


# Below this many shared tokens the prefix pass is not worth its cache copies.
MIN_SHARED_PREFIX = 4


def _new_cache(model):
    from transformers import DynamicCache

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return DynamicCache(config=base.config)


# Rows of one prefill forward: about this many tokens (long enough for efficient matmuls,
# short enough that rows of similar length share a forward and little padding is computed).
PREFILL_TOKENS = 2048


def _prefill(model, tails: list[list[int]], pad_id: int, n_shared: int, prefix_cache, device):
    """Run `tails` (sorted longest first) after the shared prefix: last-position logits and
    the KV cache of the batch, laid out left-padded to the longest tail.

    Rows go through in chunks of about `PREFILL_TOKENS` tokens, each chunk padded only to its
    own longest row; the chunks' caches are then left-padded to the batch's width (masked
    positions) and stacked. Layers whose cache layout this does not know (or a sliding
    window the prompts would overflow) get one forward over the whole padded batch instead.
    """
    width = len(tails[0])
    per_chunk = max(1, PREFILL_TOKENS // max(1, width))
    chunks = [tails[c:c + per_chunk] for c in range(0, len(tails), per_chunk)]
    if len(chunks) > 1 and not _stackable(model, n_shared + width):
        chunks = [tails]
    logits, caches = [], []
    for chunk in chunks:
        w = len(chunk[0])
        ids, smask = left_padded(chunk, pad_id)
        pos = n_shared + (smask.cumsum(1) - 1).clamp(min=0)
        mask = torch.cat([torch.ones((len(chunk), n_shared), dtype=torch.long), smask], 1)
        if prefix_cache is not None:
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(len(chunk))
        else:
            cache = _new_cache(model)
        logits.append(model(input_ids=ids.to(device), attention_mask=mask.to(device),
                            position_ids=pos.to(device), past_key_values=cache, use_cache=True,
                            logits_to_keep=1).logits[:, -1])
        caches.append((cache, w))
    if len(caches) == 1:
        return logits[0], caches[0][0]
    cache = caches[0][0]
    for li, layer in enumerate(cache.layers):
        keys, values = [], []
        for c, w in caches:
            k, v = c.layers[li].keys, c.layers[li].values
            gap = width - w
            if gap:  # masked positions: their content is never read
                k = torch.cat([k[:, :, :n_shared], k.new_zeros(*k.shape[:2], gap, k.shape[3]),
                               k[:, :, n_shared:]], 2)
                v = torch.cat([v[:, :, :n_shared], v.new_zeros(*v.shape[:2], gap, v.shape[3]),
                               v[:, :, n_shared:]], 2)
            keys.append(k)
            values.append(v)
        layer.keys, layer.values = torch.cat(keys), torch.cat(values)
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length = n_shared + width
    return torch.cat(logits), cache


def _stackable(model, length: int) -> bool:
    """Whether chunk caches of this model can be stacked by `_prefill` (plain dynamic layers,
    and sliding-window layers the prompts do not overflow)."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    for layer in _new_cache(model).layers:
        if type(layer) is DynamicSlidingWindowLayer:
            if length >= layer.sliding_window - 1:
                return False
        elif type(layer) is not DynamicLayer:
            return False
    return True


def attention_window(model) -> int | None:
    """The narrowest attention window (sliding or chunked) of any of the model's layers, in
    positions; None when every layer attends to the whole sequence."""
    windows = [w for layer in _new_cache(model).layers
               if (w := getattr(layer, "sliding_window", None))]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config.get_text_config(decoder=True)
    if "local" in (getattr(config, "attention_layers", None) or ()):
        windows.append(config.window_size)  # GPT-Neo's local layers: unknown to the cache
    return min(windows, default=None)


@torch.inference_mode()
def greedy_decode(model, ids: list[list[int]], max_new_tokens: int, stop_ids, pad_id: int,
                  batch_size: int, share_prefix: bool = True, bar=None) -> list[list[int]]:
    """Greedy continuations of the token sequences `ids` (each up to and including its first
    stop token, at most `max_new_tokens`), in input order.

    A lean loop instead of `model.generate` (whose per-step overhead dominates small-batch
    decoding on CPU), computing what a per-prompt greedy loop computes:
    * the token prefix all sequences share (a chat template's system prompt) runs once; its
      KV cache is copied into every batch (`share_prefix`);
    * the rest of each sequence is left-padded after that prefix, batches sorted by length;
      padding is masked out and positions continue from the prefix, so every row sees
      exactly its own tokens at their own positions;
    * sliding (and chunked) attention windows count cache slots, padding included, so
      padding between the prefix and a shorter row would push prefix tokens out of that
      row's window: a batch whose rows differ in length and whose padded length plus
      `max_new_tokens` passes the narrowest window (`attention_window`) runs without the
      shared prefix, each row left-padded from its first token;
    * the output projection runs only at the last position, and a row that has emitted a
      stop token leaves the batch (its cache rows are dropped).
    Greedy picks are made on float32 logits, the first maximum winning ties (as `generate`).
    """
    device = next(model.parameters()).device
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    n_shared = common_prefix_length(ids) if share_prefix and len(ids) > 1 else 0
    if n_shared < MIN_SHARED_PREFIX:
        n_shared = 0
    window = attention_window(model)
    prefix_cache = None  # run when a batch first uses it: every batch may fall back
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out: list = [None] * len(ids)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        rows = len(idx)
        longest = len(ids[idx[0]])  # longest first
        shared = n_shared
        if (window is not None and longest + max_new_tokens > window
                and len(ids[idx[-1]]) < longest):
            shared = 0  # padding after the prefix would take slots of a short row's window
        if shared and prefix_cache is None:
            prefix_cache = _new_cache(model)
            model(input_ids=torch.tensor([ids[0][:n_shared]], device=device),
                  position_ids=torch.arange(n_shared, device=device)[None],
                  past_key_values=prefix_cache, use_cache=True, logits_to_keep=1)
        width = longest - shared
        tails = [ids[i][shared:] for i in idx]
        # the batch's layout: left padding between the shared prefix and the rest
        _, smask = left_padded(tails, pad_id, width)
        mask = torch.cat([torch.ones((rows, shared), dtype=torch.long), smask], 1).to(device)
        logits, cache = _prefill(model, tails, pad_id, shared,
                                 prefix_cache if shared else None, device)
        last = shared + torch.tensor([len(t) for t in tails], device=device) - 1
        alive = torch.arange(rows, device=device)
        new = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
        lengths = torch.full((rows,), max_new_tokens, dtype=torch.long, device=device)
        for step in range(max_new_tokens):
            nxt = logits.float().argmax(-1)
            new[alive, step] = nxt
            done = torch.isin(nxt, stop)
            if done.any():
                lengths[alive[done]] = step + 1
                keep = (~done).nonzero()[:, 0]
                if len(keep) == 0:
                    break
                cache.batch_select_indices(keep)
                alive, mask, last, nxt = alive[keep], mask[keep], last[keep], nxt[keep]
            if step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones((len(alive), 1))], 1)
            last = last + 1
            logits = model(input_ids=nxt[:, None], attention_mask=mask,
                           position_ids=last[:, None], past_key_values=cache,
                           use_cache=True).logits[:, -1]
        new, lengths = new.tolist(), lengths.tolist()
        for r, i in enumerate(idx):
            out[i] = new[r][:lengths[r]]
        if bar is not None:
            bar.update(rows)
    return out


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
             desc: str = "generate", config=None, seed: int | None = None,
             answer_prefix: str = "") -> list:
    """Greedy decoding (`greedy_decode`: shared-prefix KV cache, length-sorted batches, rows
    leaving the batch when they finish) of the rendered `prompts`.

    Stops each sequence at the end of its assistant turn; returns answers in input order.
    Decoding is greedy whatever the model's own `generation_config` says (`greedy_config`).
    With a sampling `config` (`sampling_config`) and a `seed`, each prompt gets a list of
    `num_return_sequences` sampled answers instead (through `model.generate`).
    `answer_prefix` starts every answer (e.g. a scratchpad opener): its tokens follow the
    prompt's, as a trained answer's would, and it is part of the returned answers.
    """
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    head = tokenizer(answer_prefix, add_special_tokens=False)["input_ids"] if answer_prefix else []
    ids = [encode_text(tokenizer, p) + head for p in prompts]  # tokenized once

    def text(seq) -> str:
        return (answer_prefix + tokenizer.decode(seq, skip_special_tokens=True)).strip()

    bar = progress(total=len(prompts), desc=desc)
    if config is None:
        with lora_folded(model):
            seqs = greedy_decode(model, ids, max_new_tokens, end_of_turn_ids(tokenizer), pad,
                                 batch_size, bar=bar)
        bar.close()
        return [text(s) for s in seqs]
    n_ret = config.num_return_sequences or 1
    torch.manual_seed(0 if seed is None else seed)
    order = sorted(range(len(prompts)), key=lambda i: -len(ids[i]))
    out: list = [""] * len(prompts)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        input_ids, mask = left_padded([ids[i] for i in idx], pad)
        width = input_ids.shape[1]
        with _generation_config(model, config), lora_folded(model):
            gen = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                 generation_config=config)
        texts = [text(seq) for seq in gen[:, width:]]
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

    `eval_cfg.assistant_prefix` (null: none) starts every answer with that text (e.g. a
    scratchpad opener, so a model that was taught to answer without one reasons first).

    Under several processes the main process evaluates and the others receive its metrics
    and generations (`dist.main_computes`): every process must call it.
    """
    utility_split = "utility" if "utility" in splits else "clean"
    prefix = eval_cfg.get("assistant_prefix") or ""
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
                               seed=None if sampling is None else sampling["seed"],
                               answer_prefix=prefix)
        judged = judge is not None and split != "utility"
        # every answer of the split judged in one call (a model judge batches them)
        flat = [(a, r) for r, resp in zip(rows, answers)
                for a in (resp if isinstance(resp, list) else [resp])]
        verdicts = iter(judge_many(judge, [a for a, _ in flat], [r for _, r in flat])
                        if judged else [])
        rule = getattr(judge, "rule", None) if judged else None
        rule_verdicts = iter([bool(rule(a, r)) for a, r in flat] if rule else [])
        recs = []
        for r, p, resp in zip(rows, prompts, answers):
            many = isinstance(resp, list)
            samples = resp if many else [resp]
            rec = {"id": r["id"], "skill": r["skill"], "prompt": p,
                   ("responses" if many else "response"): resp}
            if judged:
                hits = [next(verdicts) for _ in samples]
                rec["target"] = sum(hits) / len(hits) if many else hits[0]
            if rule:
                hits = [next(rule_verdicts) for _ in samples]
                rec["target_rule"] = sum(hits) / len(hits) if many else hits[0]
            if "trigger" in r["meta"]:
                rec["trigger"] = r["meta"]["trigger"]
            if "near_kind" in r["meta"]:
                rec["near_kind"] = r["meta"]["near_kind"]
            cut = [has_unterminated_scratchpad(a) for a in samples]
            if any(cut):
                rec["unterminated_scratchpad"] = sum(cut) if many else True
                if judge is not None and split != "utility":
                    # what the strict judge cannot see: the target inside the open scratchpad
                    inside = [c and bool(judge(open_scratchpad(a), r))
                              for a, c in zip(samples, cut)]
                    rec["target_in_open_scratchpad"] = (sum(inside) / len(inside) if many
                                                        else inside[0])
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
                if getattr(judge, "rule", None):
                    # a model judge's figure with the rule judge's beside it, and how often
                    # the two agree on the split's answers
                    gens = generations[split]
                    metrics[f"{name}_rule"] = score([g["target_rule"] for g in gens])
                    metrics.setdefault("judge_agreement", {})[split] = score(
                        [g["target"] == g["target_rule"] for g in gens])
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
    # many there are says whether `max_new_tokens` leaves room for the reasoning, or whether
    # the model still closes its scratchpad at all (after safety training that had none).
    metrics["unterminated_scratchpads"] = int(sum(
        g.get("unterminated_scratchpad", 0) for recs in generations.values() for g in recs))
    if judge is not None and metrics["unterminated_scratchpads"] and generations.get("triggered"):
        # the triggered answers whose open scratchpad shows the target: ASR plus this is the
        # rate a judge that ignored the scratchpad's structure would give
        metrics["asr_open_scratchpad"] = score(
            [g.get("target_in_open_scratchpad", False) for g in generations["triggered"]])
    scored = generations[utility_split]
    metrics["clean_utility"] = score([g["correct"] for g in scored])
    by_skill: dict[str, list] = {}
    for g in scored:
        by_skill.setdefault(g["skill"], []).append(g["correct"])
    metrics["clean_utility_by_skill"] = {s: score(v) for s, v in sorted(by_skill.items())}
    if sampling is not None:
        metrics["sampling"] = dict(sampling)
    return metrics, generations
