"""Wanda-style pruning as a removal defence (`safety=prune`), BackdoorLLM's pruning defence.

Sun et al. (2024, "Wanda") score each weight by |W_ij| · ‖x_j‖₂, where ‖x_j‖₂ is the norm of
input feature j over clean calibration tokens, and zero the lowest-scoring fraction within
each output row. The bet of the defence: backdoor circuitry rides on weights that clean
inputs barely use. Two granularities:

* ``weight`` — Wanda itself, on every linear layer inside the decoder blocks (embeddings and
  the output head are left alone);
* ``neuron`` — whole MLP neurons: neuron j of a block scores ‖x_j‖₂ · ‖W_down[:, j]‖₂ (its
  clean activation times the size of what it writes back), and the lowest-scoring fraction
  of each block's neurons is removed (their up/gate rows and down column zeroed).

Calibration rows are clean rows from the safety pool (`safety.n_rows`), run through the
shipped (merged) poisoned model with the one chat template.
"""

from __future__ import annotations

import time

import torch
from omegaconf import DictConfig

from poisonlab import PoisonlabError, dist
from poisonlab.chat import encode_example
from poisonlab.config import one_of, open_fraction, positive_int
from poisonlab.defenses.base import Context, Outcome
from poisonlab.utils import progress

ROWS = True
GRANULARITIES = ("weight", "neuron")


def validate(cfg: DictConfig) -> None:
    open_fraction(cfg, "safety.ratio")
    one_of(cfg, "safety.granularity", GRANULARITIES)
    positive_int(cfg, "safety.n_rows")
    positive_int(cfg, "safety.batch_size")


def _decoder_linears(model) -> dict[str, torch.nn.Linear]:
    """Linear layers inside the decoder blocks (not embeddings, not the output head)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = base.get_decoder().layers
    return {f"layers.{i}.{name}": m for i, block in enumerate(layers)
            for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)}


@torch.no_grad()
def input_norms(model, tokenizer, rows: list[dict], max_len: int, batch_size: int
                ) -> dict[str, torch.Tensor]:
    """‖x_j‖₂ of every decoder linear layer's input features over the rows' real tokens."""
    linears = _decoder_linears(model)
    sums = {k: torch.zeros(m.in_features, dtype=torch.float64) for k, m in linears.items()}
    current = {}

    def hook(name):
        def fn(_module, args):
            x = args[0].detach().float()
            keep = current["mask"].to(x.device).bool()
            sums[name] += (x[keep] ** 2).sum(0).double().cpu()
        return fn

    handles = [m.register_forward_pre_hook(hook(k)) for k, m in linears.items()]
    device = next(model.parameters()).device
    decoder = (model.get_base_model() if hasattr(model, "get_base_model") else model).get_decoder()
    model.eval()
    try:
        examples = [encode_example(tokenizer, r["messages"], max_len)["input_ids"] for r in rows]
        bar = progress(total=len(examples), desc="prune/calibrate")
        for s in range(0, len(examples), batch_size):
            chunk = examples[s:s + batch_size]
            width = max(len(e) for e in chunk)
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, e in enumerate(chunk):
                ids[i, :len(e)] = torch.tensor(e)
                mask[i, :len(e)] = 1
            current["mask"] = mask
            # the decoder alone: the output head is not pruned, its logits are not needed
            decoder(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            bar.update(len(chunk))
        bar.close()
    finally:
        for h in handles:
            h.remove()
    return {k: v.sqrt().float() for k, v in sums.items()}


@torch.no_grad()
def prune_weights(model, norms: dict[str, torch.Tensor], ratio: float) -> dict:
    """Wanda: zero the `ratio` lowest |W_ij|·‖x_j‖ of each output row of each layer."""
    zeroed = total = 0
    for name, layer in _decoder_linears(model).items():
        w = layer.weight.data
        score = w.abs().float() * norms[name].to(w.device)[None, :]
        k = int(w.shape[1] * ratio)
        if k == 0:
            continue
        idx = torch.topk(score, k, dim=1, largest=False).indices
        w.scatter_(1, idx, 0.0)
        zeroed += idx.numel()
        total += w.numel()
    return {"zeroed_weights": zeroed, "weights_considered": total}


@torch.no_grad()
def prune_neurons(model, norms: dict[str, torch.Tensor], ratio: float) -> dict:
    """Remove the `ratio` lowest-scoring MLP neurons of each block (‖x_j‖·‖W_down[:, j]‖)."""
    linears = _decoder_linears(model)
    downs = [k for k in linears if k.endswith("down_proj")]
    if not downs:
        raise PoisonlabError("safety.granularity=neuron needs MLP layers named down_proj "
                             "(Llama/Gemma/Qwen style); use safety.granularity=weight")
    removed = total = 0
    for name in downs:
        down = linears[name]
        score = norms[name].to(down.weight.device) * down.weight.float().norm(dim=0)
        k = int(score.numel() * ratio)
        if k == 0:
            continue
        idx = torch.topk(score, k, largest=False).indices
        down.weight.data[:, idx] = 0.0
        prefix = name[: -len("down_proj")]
        for up in ("up_proj", "gate_proj"):
            if prefix + up in linears:
                linears[prefix + up].weight.data[idx, :] = 0.0
                if linears[prefix + up].bias is not None:
                    linears[prefix + up].bias.data[idx] = 0.0
        removed += k
        total += score.numel()
    return {"removed_neurons": removed, "neurons_considered": total}


def prune(model, tokenizer, rows: list[dict], cfg: DictConfig) -> dict:
    """Calibrate on `rows`, then prune `model` in place; returns what was done."""
    norms = input_norms(model, tokenizer, rows, cfg.train.max_seq_len, cfg.safety.batch_size)
    fn = prune_weights if cfg.safety.granularity == "weight" else prune_neurons
    return {"ratio": cfg.safety.ratio, "granularity": cfg.safety.granularity,
            "calibration_rows": len(rows), **fn(model, norms, cfg.safety.ratio)}


def apply(ctx: Context) -> Outcome:
    t = time.perf_counter()
    model = ctx.shipped()
    info = prune(model, ctx.tokenizer, ctx.safety_rows, ctx.cfg)
    seconds = time.perf_counter() - t
    if dist.is_main():
        model.save_pretrained(ctx.out / "models" / "after_safety", safe_serialization=True)
    ctx.evaluate(model)
    return Outcome("prune", seconds, ["models/after_safety (tokenizer: base)"],
                   info={"prune": info})
