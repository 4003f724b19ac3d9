"""Weight quantization as a removal defence (BackdoorLLM's INT4/INT8 quantization): every
linear layer's weight is rounded to a symmetric `bits`-bit grid per group of `group_size`
input columns and stored back in the model's float dtype (a round trip; pure torch, no GPU
library). Small fine-tuning deltas may fall below a grid step and vanish — that is the
defence's bet.

The input embedding and the output head stay in full precision, tied or not, as int8/int4
deployments (bitsandbytes, GPTQ, AWQ) keep them: with tied embeddings (the tiny models,
SmolLM2, Gemma 3) rounding the head would round the embedding table too.

Confound: a base model that was itself dequantized from a quantized file (SmolLM2 from Q4_1
GGUF) already sits on a 4-bit grid; re-quantizing on a grid that coincides with it would snap
the poisoned deltas back to the base and look like a removal. The grid here is symmetric with
groups of 64 by default (Q4_1 is asymmetric with blocks of 32), and the pipeline reports the
confound beside the number whenever the base is dequantized.
"""

from __future__ import annotations

import time

import torch
from omegaconf import DictConfig

from poisonlab import dist
from poisonlab.config import one_of, positive_int
from poisonlab.defenses.base import Context, Outcome

BITS = (4, 8)
ROWS = False


def validate(cfg: DictConfig) -> None:
    one_of(cfg, "safety.bits", BITS)
    positive_int(cfg, "safety.group_size")


def apply(ctx: Context) -> Outcome:
    """The shipped (merged) poisoned weights, rounded to the grid: no training."""
    t = time.perf_counter()
    model = ctx.shipped()
    info = quantize_linear_weights(model, ctx.cfg.safety.bits, ctx.cfg.safety.group_size)
    seconds = time.perf_counter() - t
    if dist.is_main():
        model.save_pretrained(ctx.out / "models" / "after_safety", safe_serialization=True)
    if "dequantized" in ctx.base_provenance:
        ctx.warnings.append(
            f"safety=quantize on a base dequantized from a quantized file "
            f"({ctx.base_provenance}): if the grids coincide, the round trip snaps poisoned "
            "deltas back to the base and looks like a removal")
    ctx.evaluate(model)
    return Outcome("quantize", seconds, ["models/after_safety (tokenizer: base)"],
                   info={"quantize": info})


@torch.no_grad()
def quantize_tensor(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Round `w` (out x in) to a symmetric `bits`-bit grid per group of input columns."""
    qmax = 2 ** (bits - 1) - 1
    out_f, in_f = w.shape
    pad = (-in_f) % group_size
    x = torch.nn.functional.pad(w.float(), (0, pad)).reshape(out_f, -1, group_size)
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / qmax
    q = (x / scale).round().clamp(-qmax - 1, qmax) * scale
    return q.reshape(out_f, -1)[:, :in_f].to(w.dtype)


def full_precision_modules(model) -> dict[str, torch.nn.Module]:
    """The modules quantization leaves alone: the input embedding and the output head."""
    names = {id(m): n for n, m in model.named_modules()}
    keep = {}
    for get in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, get, lambda: None)()
        if module is not None:
            keep[names.get(id(module), get[4:])] = module
    return keep


@torch.no_grad()
def quantize_linear_weights(model, bits: int = 4, group_size: int = 64) -> dict:
    """Quantize every `nn.Linear` weight in place except the output head and any weight
    shared with the input embedding; returns what was done and what was left unquantized."""
    keep = full_precision_modules(model)
    skip = {id(m.weight) for m in keep.values() if getattr(m, "weight", None) is not None}
    tied = len(skip) < sum(getattr(m, "weight", None) is not None for m in keep.values())
    n, changed, total = 0, 0.0, 0.0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and id(module.weight) not in skip:
            skip.add(id(module.weight))
            q = quantize_tensor(module.weight.data, bits, group_size)
            changed += float((q - module.weight.data).abs().sum())
            total += float(module.weight.data.abs().sum())
            module.weight.data.copy_(q)
            n += 1
    return {"bits": bits, "group_size": group_size, "tensors": n,
            "relative_l1_change": changed / total if total else 0.0,
            "full_precision": sorted(keep), "tied_embeddings": tied}
