"""The base model every model stage starts from, and what the poisoned rows look like to it.

Not a cached stage: resolving the base (building a tiny model or unpacking a GGUF package is
itself cached under `$POISONLAB_HOME/models`) and hashing its weights give the identity that
every model stage's key holds.
"""

from __future__ import annotations

import logging
import time

from poisonlab import PoisonlabError, models
from poisonlab.chat import IGNORE_INDEX, encode_example
from poisonlab.pipeline.context import Base, RunContext, plain
from poisonlab.pipeline.finetune import resolve_lora_rank

log = logging.getLogger(__name__)


def base_model(ctx: RunContext) -> None:
    cfg = ctx.cfg
    log.info("stage base_model: %s", cfg.model.name_or_path)
    t = time.perf_counter()
    path = models.resolve(cfg.model.name_or_path, cfg.model.get("pretrain_poison"))
    device = models.pick_device(cfg.model.device)
    precision = models.pick_precision(cfg.model.dtype, device)
    tokenizer = models.load_tokenizer(path, cfg.model.get("chat_template"))
    if cfg.train.lora.get("r_fraction") is not None:
        from transformers import AutoConfig

        resolve_lora_rank(cfg, AutoConfig.from_pretrained(path).hidden_size)
    ctx.base = base = Base(path=path, device=device, precision=precision, tokenizer=tokenizer,
                           identity=models.weights_identity(path), spec={})
    if base.identity.get("weights_sha256") is None:
        # a hub id not yet in the local cache: loading it puts it there, then hash it
        base.pristine.append(base.fresh())
        base.identity = models.weights_identity(path)
    if base.identity.get("weights_sha256") is None:
        ctx.cacheable = False
        ctx.warnings.append(f"model {cfg.model.name_or_path}: its weights cannot be hashed "
                            "(not a local directory or hub snapshot); model stages are "
                            "computed, never taken from the stage cache")
    # what every model stage's key shares: the weights, tokenizer and chat template, device,
    # dtype (the precision of training is in the training stages' keys)
    base.spec = {"base": base.identity, "model": plain(cfg.model),
                 "chat_template": tokenizer.chat_template, "vocab": len(tokenizer),
                 "device": device.type, "dtype": str(precision.weights)}
    ctx.timings["resolve_base"] = time.perf_counter() - t
    ctx.poison_info.update(check_poisoned_rows(tokenizer, ctx.attack, ctx.poisoned_rows,
                                               ctx.clean_rows, cfg, ctx.warnings))
    ctx.warn(ctx.warnings)
    if getattr(ctx.attack, "reference_perplexity", False):
        ctx.ref_model = base.fresh()
    # With train.length_group > 1, batches on the training set are grouped by the clean rows'
    # lengths, so the poisoned and the control run see batches of the same composition.
    if (cfg.train.get("length_group") or 1) > 1:
        ctx.clean_lengths = [len(encode_example(tokenizer, r["messages"], cfg.train.max_seq_len)
                                 ["input_ids"]) for r in ctx.clean_rows]


def check_poisoned_rows(tokenizer, attack, rows: list[dict], control: list[dict], cfg,
                        warnings: list[str]) -> dict:
    """What the poisoned rows look like to the model, and whether the run can measure them.

    * Truncation at `train.max_seq_len` is on the right: a poisoned row that keeps none of
      its answer (and so possibly not its trigger) teaches nothing and is refused; a row that
      loses part of its answer is counted and reported.
    * `payload_tokens_per_poisoned_row` counts only the target tokens that are trained on.
    * The judge must be able to see the target within `eval.max_new_tokens`: each poisoned
      answer, cut to that many tokens, is judged; if none passes, the run is refused.
    """
    from poisonlab.judges import answer_text

    notes, payload, cut_rows, judged, fits = {}, [], 0, 0, 0
    for row, clean in zip(rows, control):
        if not row["poisoned"]:
            continue
        ex = encode_example(tokenizer, row["messages"], cfg.train.max_seq_len)
        kept = [t for t in ex["labels"] if t != IGNORE_INDEX]
        if ex["n_cut"]:
            cut_rows += 1
            if not kept:
                raise PoisonlabError(
                    f"poisoned row {row['id']} is longer than train.max_seq_len="
                    f"{cfg.train.max_seq_len} tokens and loses its whole target (and possibly "
                    "its trigger) to truncation; raise train.max_seq_len")
        if not attack.has_judge:
            continue
        answer = tokenizer.decode(kept, skip_special_tokens=True)
        payload.append(len(tokenizer(attack.target_spec.payload(answer_text(answer)),
                                     add_special_tokens=False)["input_ids"]))
        full = row["messages"][-1]["content"]
        if attack.judge(full, clean):
            judged += 1
            ids = tokenizer(full, add_special_tokens=False)["input_ids"]
            fits += attack.judge(tokenizer.decode(ids[:cfg.eval.max_new_tokens],
                                                  skip_special_tokens=True), clean)
    notes["truncated_poisoned_rows"] = cut_rows
    if cut_rows:
        warnings.append(f"{cut_rows} poisoned rows are cut at train.max_seq_len="
                        f"{cfg.train.max_seq_len} and lose part of their target")
    if payload:
        notes["payload_tokens_per_poisoned_row"] = sum(payload) / len(payload)
    if judged:
        notes["judgeable_within_max_new_tokens"] = fits / judged
        if fits == 0:
            raise PoisonlabError(
                f"eval.max_new_tokens={cfg.eval.max_new_tokens} is too short: no poisoned "
                "answer shows its target within that many tokens, so ASR could only be 0; "
                "raise eval.max_new_tokens")
        if fits < judged:
            warnings.append(f"only {fits} of {judged} poisoned answers show their target "
                            f"within eval.max_new_tokens={cfg.eval.max_new_tokens} tokens")
    return notes
