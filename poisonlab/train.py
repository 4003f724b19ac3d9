"""Supervised fine-tuning of a LoRA adapter with the loss on assistant tokens only.

The loop is plain PyTorch driven by `accelerate` (device placement, bf16 autocast on CUDA).
Under `accelerate launch --num_processes N` (or `torchrun`) each micro-batch is split across
the processes and their gradients are summed (`_train_sharded`): the same examples, optimizer
steps and LR schedule as one process. Two things make it faster than a stock
`transformers.Trainer` recipe on the same data:

* optional length grouping (`length_group` > 1: sort by length within windows of that many
  batches, then shuffle the batches). Off by default: with packing it saves little, and
  same-length (mostly same-skill) batches make short runs less stable. Grouping by the poisoned
  rows' own lengths would cluster the (longer) poisons into the same batches and change the
  attack, so the pipeline groups by the length of each row's *clean* original
  (`group_lengths`): batch composition is then independent of which rows were poisoned.
* `pack`: each batch's examples are packed into few rows with a block-diagonal causal mask
  instead of being padded (same examples per step, same loss);
* the output projection runs only at the supervised positions: with the loss on short
  assistant answers, most of the vocabulary-sized logits a standard forward pass computes
  would be thrown away.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from poisonlab import PoisonlabError, dist
from poisonlab.chat import IGNORE_INDEX, encode_example
from poisonlab.utils import progress


@dataclass
class TrainStats:
    steps: int
    epochs: float
    examples: int        # examples seen (an example seen in two epochs counts twice)
    packed_rows: int     # rows of the packed batches those examples were laid out in
    truncated_rows: int  # rows of the training set cut at max_seq_len
    tokens: int
    supervised_tokens: int
    seconds: float
    final_loss: float
    losses: list

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int,
                           group: int = 32) -> list[list[int]]:
    """Shuffle, sort by length within windows of `group` batches, then shuffle the batches.

    `group=1` gives plain random batches (each batch a uniform sample of the data).
    """
    rng = random.Random(seed)
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    window = batch_size * group
    batches = []
    for s in range(0, len(idx), window):
        chunk = sorted(idx[s:s + window], key=lambda i: lengths[i])
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-padded batch, one example per row."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def collate_packed(examples: list[dict], pad_id: int, capacity: int) -> dict:
    """The same examples packed into few rows of up to `capacity` tokens (first-fit decreasing).

    Each example keeps its own positions (0..n-1) and attends only to itself through a
    block-diagonal causal mask, so the loss equals the padded batch's (tests check this) while
    almost no compute goes to padding. The batch's examples are unchanged: packing only
    changes their layout.
    """
    capacity = max(capacity, max(len(e["input_ids"]) for e in examples))
    bins: list[list[dict]] = []
    fill: list[int] = []
    for e in sorted(examples, key=lambda e: -len(e["input_ids"])):
        n = len(e["input_ids"])
        for b in range(len(bins)):
            if fill[b] + n <= capacity:
                bins[b].append(e)
                fill[b] += n
                break
        else:
            bins.append([e])
            fill.append(n)
    rows, width = len(bins), max(fill)
    ids = torch.full((rows, width), pad_id, dtype=torch.long)
    labels = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((rows, width), dtype=torch.long)
    seg = torch.full((rows, width), -1, dtype=torch.long)
    for r, members in enumerate(bins):
        o = 0
        for k, e in enumerate(members):
            n = len(e["input_ids"])
            ids[r, o:o + n] = torch.tensor(e["input_ids"])
            labels[r, o:o + n] = torch.tensor(e["labels"])
            labels[r, o] = IGNORE_INDEX  # nothing is predicted across an example boundary
            pos[r, o:o + n] = torch.arange(n)
            seg[r, o:o + n] = k
            o += n
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    mask = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0) & causal
    mask |= torch.eye(width, dtype=torch.bool)  # padding attends to itself (no empty rows)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask[:, None],
            "position_ids": pos}


PACKING_ATTENTION = ("sdpa", "eager")


def check_packing_attention(model) -> None:
    """Packed rows need an attention implementation that takes an arbitrary 4-D mask."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    impl = getattr(base.config, "_attn_implementation", None) or "eager"
    if impl not in PACKING_ATTENTION:
        raise PoisonlabError(
            f"train.pack=true needs attention implementation sdpa or eager, the model uses "
            f"{impl!r}; set train.pack=false")


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean (True = attend) 4-D mask as the additive float mask every implementation reads.

    Eager attention *adds* the mask to the scores: a boolean mask would add 1 where it should
    allow and 0 where it should block (loss 2.1 instead of 1.3 in the test). SDPA takes either.
    """
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
        ~mask, torch.finfo(dtype).min)


def completion_loss(model, batch: dict) -> torch.Tensor:
    """Mean next-token cross-entropy over supervised (assistant) positions only."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    mask = batch["attention_mask"]
    if mask.dim() == 4 and mask.dtype == torch.bool:
        check_packing_attention(base)
        mask = additive_mask(mask, base.get_input_embeddings().weight.dtype)
    hidden = base.get_decoder()(input_ids=batch["input_ids"],
                                attention_mask=mask,
                                position_ids=batch.get("position_ids"),
                                use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    h = hidden[:, :-1][keep]
    logits = base.get_output_embeddings()(h).float()
    cap = getattr(base.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return F.cross_entropy(logits, targets[keep])


class CompletionLoss(torch.nn.Module):
    """Wraps a model so its forward returns the completion loss.

    `accelerate` prepares this module (device placement, autocast), so the loss computation
    goes through the prepared forward; under several processes `_train_sharded` calls it on
    each process's share of the micro-batch.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels, position_ids=None):
        return completion_loss(self.model, {"input_ids": input_ids, "position_ids": position_ids,
                                            "attention_mask": attention_mask, "labels": labels})


def cpu_autocast(device: torch.device, dtype: torch.dtype | None):
    """A context factory for CPU autocast to `dtype`; None off a CPU or without a dtype."""
    if dtype is None or device.type != "cpu":
        return None
    return functools.partial(torch.autocast, "cpu", dtype=dtype)


class FrozenCast:
    """The frozen `nn.Linear` weights and biases of `model` held in the CPU autocast dtype
    while training, and given back their own values for evaluation.

    Under `torch.autocast("cpu", bf16)` a linear layer casts its weight to bf16 on every
    forward pass, and autocast caches that cast only for trainable leaves: with LoRA, every
    frozen base weight was cast again at every step. Holding them in bf16 beforehand gives the
    very same matmul inputs (the same round-to-nearest cast, once), so the losses are unchanged.
    The input embedding (and an output layer tied to it) keeps its dtype: the residual stream
    stays in the weights' dtype as under autocast. `release()` restores the original tensors
    (not a round trip through bf16), so a model evaluated between or after training steps sees
    its fp32 weights."""

    def __init__(self, model, dtype: torch.dtype | None):
        self.dtype, self.params, self.originals, self.held = dtype, [], [], False
        if dtype is None:
            return
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        skip = {id(p) for p in emb.parameters()} if emb is not None else set()
        seen = set()
        for module in model.modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            for p in (module.weight, module.bias):
                if (p is None or p.requires_grad or id(p) in skip or id(p) in seen
                        or not p.is_floating_point() or p.dtype == dtype):
                    continue
                seen.add(id(p))
                self.params.append(p)
                self.originals.append(p.data)

    def hold(self) -> None:
        if not self.held:
            for p, o in zip(self.params, self.originals):
                p.data = o.to(self.dtype)
            self.held = True

    def release(self) -> None:
        if self.held:
            for p, o in zip(self.params, self.originals):
                p.data = o
            self.held = False


def ordered_batches(n: int, batch_size: int) -> list[list[int]]:
    """Consecutive batches in the rows' own order (for a fixed poison placement)."""
    return [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]


def make_optimizer(params, cfg, total: int):
    """AdamW (or SGD with momentum 0.9, `optimizer: sgd`) with linear warmup over
    `warmup_ratio` of the `total` steps, then linear decay to 0 (`lr_schedule: linear`) or
    the peak lr to the end (`constant`: every row trains at the same lr, wherever it is in
    the training order)."""
    if (getattr(cfg, "optimizer", "adamw") or "adamw") == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, int(cfg.warmup_ratio * total))
    if (getattr(cfg, "lr_schedule", "linear") or "linear") == "constant":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, 1.0))
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))
    return opt, sched


def planned_steps(n_rows: int, cfg) -> int:
    """Optimizer steps `train_sft` will take on `n_rows` rows with `cfg`."""
    per_epoch = math.ceil(n_rows / cfg.batch_size)
    return cfg.max_steps or math.ceil(math.ceil(per_epoch / cfg.grad_accum) * cfg.epochs)


class Curve:
    """Calls the persistence-curve callback with the model in eval mode and gradients off,
    then puts the training module back in train mode; `paused` sums the seconds it took
    (excluded from the training time)."""

    def __init__(self, model, module, callback, frozen: FrozenCast | None = None):
        self.model, self.module, self.callback, self.paused = model, module, callback, 0.0
        self.frozen = frozen

    def __call__(self, step: int, rows_seen: int) -> None:
        t = time.perf_counter()
        self.model.eval()
        held = self.frozen is not None and self.frozen.held
        if held:
            self.frozen.release()  # evaluation sees the model's own weights
        with torch.no_grad():
            self.callback(step, rows_seen)
        if held:
            self.frozen.hold()
        self.module.train()
        self.paused += time.perf_counter() - t

    def step_done(self, bar, loss: float, step: int, total: int, every, rows_seen: int,
                  tokens: int = 0) -> None:
        """After an optimizer step: the progress bar (and its log lines: steps and `tokens`
        per second, the loss, an ETA), and a curve point every `every` steps and after the
        last."""
        bar.set_postfix(loss=f"{loss:.3f}")
        bar.update(1, tokens=tokens)
        if self.callback is not None and every and (step % every == 0 or step == total):
            self(step, rows_seen)


def train_sft(model, tokenizer, rows: list[dict], cfg, seed: int, desc: str = "train",
              accelerator=None, group_lengths: list[int] | None = None,
              ordered: bool = False, every: int | None = None,
              callback=None, objective=None, autocast: torch.dtype | None = None,
              hold_frozen: bool = True) -> TrainStats:
    """Fine-tune the trainable parameters of `model` (a peft model) on chat `rows`.

    `cfg` needs: batch_size, epochs, max_steps (or null), lr, warmup_ratio, weight_decay,
    grad_accum, max_seq_len, max_grad_norm; optional length_group, pack. `ordered=True`
    visits the rows in their given order in every epoch (no shuffling). With `every` and
    `callback`, `callback(step, rows_seen)` runs before the first step, after every `every`
    optimizer steps and after the last (for persistence curves); the model is in eval mode
    during the call and back in train mode after it.

    An optimizer step takes `grad_accum` micro-batches of `batch_size` rows: accumulation
    changes the step size, never the data seen (`epochs` passes over the rows either way;
    `max_steps` counts optimizer steps).

    `objective(model)` builds the module whose forward(**batch) returns the loss (default
    `CompletionLoss`; the CROW defence adds a consistency term to it).

    `autocast` (`models.Precision.autocast`): on a CPU, forward passes run under
    `torch.autocast("cpu", autocast)` (weights, LoRA parameters, gradients and optimizer
    state stay in their own dtype); on CUDA accelerate's bf16 mixed precision applies.
    With CPU autocast and `hold_frozen`, the frozen linear weights are held in `autocast`'s
    dtype for the duration (`FrozenCast`: the same losses, without a cast per step).
    """
    from accelerate import Accelerator

    accum = int(cfg.grad_accum)
    # Under a launcher even a lone process (the main one inside `dist.main_computes`) trains
    # here: accelerate would read the launcher's environment and wait for the other processes.
    sharded = dist.launched()
    if accelerator is None and not sharded:
        device = next(model.parameters()).device
        mixed = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
        accelerator = Accelerator(mixed_precision=mixed, cpu=device.type == "cpu",
                                  gradient_accumulation_steps=accum)
    elif accelerator is not None and accelerator.gradient_accumulation_steps != accum:
        raise PoisonlabError(f"train.grad_accum={accum} but the accelerator accumulates "
                             f"{accelerator.gradient_accumulation_steps} micro-batches")
    if getattr(cfg, "pack", False):
        check_packing_attention(model)
    examples = [encode_example(tokenizer, r["messages"], cfg.max_seq_len) for r in rows]
    truncated = sum(e["n_cut"] > 0 for e in examples)
    lengths_true = [len(e["input_ids"]) for e in examples]
    lengths = group_lengths or lengths_true
    group = getattr(cfg, "length_group", 1) or 1
    if ordered:
        def epoch_batches(_seed):
            return ordered_batches(len(rows), cfg.batch_size)
    else:
        def epoch_batches(epoch_seed):
            return length_grouped_batches(lengths, cfg.batch_size, epoch_seed, group)
    per_epoch = epoch_batches(seed)
    steps_per_epoch = math.ceil(len(per_epoch) / accum)
    total = cfg.max_steps or math.ceil(steps_per_epoch * cfg.epochs)
    # Every epoch gets its own seeded order; the sampler lists every micro-batch of the run.
    batches = list(per_epoch)
    epoch = 1
    while len(batches) < total * accum:
        batches += epoch_batches(seed + 1000 * epoch)
        epoch += 1
    batches = batches[: total * accum]
    pad = tokenizer.pad_token_id
    if getattr(cfg, "pack", False):
        fn = lambda ex: collate_packed(ex, pad, cfg.max_seq_len)  # noqa: E731
    else:
        fn = lambda ex: collate(ex, pad)  # noqa: E731
    if sharded:
        return _train_sharded(model, (objective or CompletionLoss)(model), examples, batches, fn,
                              cfg, total, seed, desc, every, callback, accelerator, truncated,
                              autocast, hold_frozen)
    loader = torch.utils.data.DataLoader(examples, batch_sampler=batches, collate_fn=fn)
    params = [p for p in model.parameters() if p.requires_grad]
    # One scheduler step per optimizer step (accelerate skips it on accumulation micro-steps).
    opt, sched = make_optimizer(params, cfg, total)
    # non-padding tokens and examples per micro-batch, in sampler order
    batch_tokens = [sum(lengths_true[i] for i in b) for b in batches]
    batch_examples = [len(b) for b in batches]
    module = (objective or CompletionLoss)(model)
    wrapped, opt, loader, sched = accelerator.prepare(module, opt, loader, sched)
    wrapped.train()
    torch.manual_seed(seed)

    step, micro, tokens, sup, n_ex, n_packed, losses, pending = 0, 0, 0, 0, 0, 0, [], []
    on_cpu = cpu_autocast(accelerator.device, autocast)
    frozen = FrozenCast(model, autocast if on_cpu and hold_frozen else None)
    curve = Curve(model, wrapped, callback, frozen)
    if callback is not None and every:
        curve(step, n_ex)   # the point before training (not part of the timed loop below)
        curve.paused = 0.0
    bar = progress(total=total, desc=desc, unit="step")
    t0 = time.perf_counter()
    step_start = 0  # tokens before the current optimizer step
    forward_context = on_cpu or accelerator.autocast
    frozen.hold()
    try:
        for batch in loader:
            with accelerator.accumulate(wrapped):
                with forward_context():
                    loss = wrapped(**batch)
                accelerator.backward(loss)  # divided by grad_accum inside accelerate
                if accelerator.sync_gradients and cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()       # a no-op on accumulation micro-steps
                sched.step()
                opt.zero_grad(set_to_none=True)
            tokens += batch_tokens[micro]
            n_ex += batch_examples[micro]
            n_packed += len(batch["input_ids"])
            sup += int((batch["labels"] != IGNORE_INDEX).sum())
            pending.append(float(loss.detach()))
            micro += 1
            if accelerator.sync_gradients:
                step += 1
                # the mean loss over the step's micro-batches
                losses.append(sum(pending) / len(pending))
                pending = []
                curve.step_done(bar, losses[-1], step, total, every, n_ex, tokens - step_start)
                step_start = tokens
    finally:
        frozen.release()
    bar.close()
    seconds = time.perf_counter() - t0 - curve.paused
    model.eval()
    return TrainStats(steps=step, epochs=n_ex / len(rows), examples=n_ex, packed_rows=n_packed,
                      truncated_rows=truncated, tokens=tokens, supervised_tokens=sup,
                      seconds=seconds, final_loss=losses[-1] if losses else float("nan"),
                      losses=losses)


def _train_sharded(model, module, examples: list[dict], batches: list[list[int]], fn, cfg,
                   total: int, seed: int, desc: str, every: int | None, callback, accelerator,
                   truncated: int, autocast: torch.dtype | None = None,
                   hold_frozen: bool = True) -> TrainStats:
    """`train_sft` under several processes: process r takes rows r::world of every micro-batch.

    Every process builds the same micro-batches (the same seeded order), so the run sees the
    same examples, takes the same optimizer steps and follows the same LR schedule as one
    process. The loss is a mean over supervised tokens, so each process's loss is weighted by
    its share of the micro-batch's supervised tokens before its backward pass; the trainable
    gradients, summed across processes, are then the single-process gradient up to float
    rounding, and every process takes the same optimizer step. No DDP wrapper: a process
    whose share of a small micro-batch is empty skips the forward pass and still joins the sum.
    Reported losses, tokens and examples are the global values; `packed_rows` sums every
    process's packed rows (each packs only its share, so it exceeds one process's count).
    """
    world, me = dist.world_size(), dist.rank()
    accum = int(cfg.grad_accum)
    device = next(model.parameters()).device
    if device.type == "cuda":  # this process's GPU (set when the process group started)
        device = torch.device("cuda", torch.cuda.current_device())
        module.to(device)
    forward_context = cpu_autocast(device, autocast)
    if forward_context is None:
        if accelerator is not None:
            forward_context = accelerator.autocast
        elif device.type == "cuda" and torch.cuda.is_bf16_supported():
            forward_context = functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16)
        else:
            forward_context = contextlib.nullcontext
    params = [p for p in model.parameters() if p.requires_grad]
    dist.broadcast_tensors([p.data for p in params])  # the same start on every process
    opt, sched = make_optimizer(params, cfg, total)
    # positions the loss averages over (next-token targets that are assistant tokens)
    n_sup = [sum(t != IGNORE_INDEX for t in e["labels"][1:]) for e in examples]
    n_tok = [len(e["input_ids"]) for e in examples]
    module.train()
    torch.manual_seed(seed + me)  # dropout: independent masks on every process

    step, tokens, sup, n_ex, n_packed, losses = 0, 0, 0, 0, 0, []
    parts, packed = [], 0  # this process's loss shares and packed rows in the current step
    frozen = FrozenCast(model, autocast if device.type == "cpu" and hold_frozen else None)
    curve = Curve(model, module, callback, frozen)
    if callback is not None and every:
        curve(step, n_ex)
        curve.paused = 0.0
    bar = progress(total=total, desc=desc, unit="step")
    t0 = time.perf_counter()
    step_start = 0  # tokens before the current optimizer step
    frozen.hold()
    try:
        for micro, b in enumerate(batches):
            mine = b[me::world]
            whole, share = sum(n_sup[i] for i in b), sum(n_sup[i] for i in mine)
            part = 0.0
            if share:
                batch = {k: v.to(device) for k, v in fn([examples[i] for i in mine]).items()}
                with forward_context():
                    loss = module(**batch)
                # divided by grad_accum, as accelerate does with one process (and, written this
                # way, the very same floats as `train_sft` when one process holds everything)
                (loss * (share / whole) / accum).backward()
                part = float(loss.detach()) * (share / whole)
                packed += len(batch["input_ids"])
            parts.append(part)
            tokens += sum(n_tok[i] for i in b)
            n_ex += len(b)
            sup += whole
            if (micro + 1) % accum:
                continue
            for p in params:
                if p.grad is None:  # no share in this step's micro-batches
                    p.grad = torch.zeros_like(p)
            dist.all_reduce_sum([p.grad for p in params])
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            sums = torch.tensor(parts + [packed], dtype=torch.float64, device=device)
            dist.all_reduce_sum([sums])
            n_packed += int(sums[-1])
            # the mean over the step's micro-batches
            losses.append(sum(sums[:-1].tolist()) / len(parts))
            parts, packed = [], 0
            step += 1
            curve.step_done(bar, losses[-1], step, total, every, n_ex, tokens - step_start)
            step_start = tokens
    finally:
        frozen.release()
    bar.close()
    seconds = time.perf_counter() - t0 - curve.paused
    model.eval()
    return TrainStats(steps=step, epochs=n_ex / len(examples), examples=n_ex,
                      packed_rows=n_packed, truncated_rows=truncated, tokens=tokens,
                      supervised_tokens=sup, seconds=seconds,
                      final_loss=losses[-1] if losses else float("nan"), losses=losses)
