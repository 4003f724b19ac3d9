"""CROW-style consistency fine-tuning (Min et al. 2025) as a removal defence (`safety=crow`).

A backdoor shows up as an abrupt change of the hidden state from one layer to the next when
the trigger is present. CROW fine-tunes on clean rows with the usual completion loss plus a
term that keeps adjacent layers' hidden states consistent even under a small adversarial
perturbation of the input embeddings:

    L_cons(e) = mean over layers l and real tokens of 1 − cos(h_l(e), h_{l+1}(e))
    δ = ε · sign(∇_e L_cons(e))                     (one FGSM step on the embeddings)
    L = L_completion(e) + α · L_cons(e + δ)

It trains like `sft` (modes fresh / continue / full, same knobs, same curves); only the loss
differs. Rows are padded, not packed (the consistency term needs per-token masks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from poisonlab.chat import IGNORE_INDEX
from poisonlab.config import positive_number
from poisonlab.defenses import sft
from poisonlab.defenses.base import Context, Outcome

ROWS = True


def validate(cfg: DictConfig) -> None:
    sft.validate(cfg)
    for key in ("safety.alpha", "safety.epsilon"):
        positive_number(cfg, key)


def consistency(hidden: tuple[torch.Tensor, ...], mask: torch.Tensor) -> torch.Tensor:
    """Mean of 1 − cos(h_l, h_{l+1}) over adjacent layer pairs and real (unpadded) tokens."""
    keep = mask.bool()
    terms = [(1 - F.cosine_similarity(a.float(), b.float(), dim=-1))[keep].mean()
             for a, b in zip(hidden[:-1], hidden[1:])]
    return torch.stack(terms).mean()


class CrowLoss(torch.nn.Module):
    """Completion loss + α · consistency loss on FGSM-perturbed input embeddings."""

    def __init__(self, model, alpha: float, epsilon: float):
        super().__init__()
        self.model, self.alpha, self.epsilon = model, alpha, epsilon

    def forward(self, input_ids, attention_mask, labels, position_ids=None):
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        decoder = base.get_decoder()
        embeds = base.get_input_embeddings()(input_ids)
        # the perturbation: one signed-gradient step that makes the layers least consistent
        probe = embeds.detach().requires_grad_(True)
        out = decoder(inputs_embeds=probe, attention_mask=attention_mask,
                      output_hidden_states=True, use_cache=False)
        grad, = torch.autograd.grad(consistency(out.hidden_states, attention_mask), probe)
        delta = self.epsilon * grad.sign()
        # clean completion loss (gradients flow into the trainable weights)
        clean = decoder(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        logits = base.get_output_embeddings()(clean.last_hidden_state[:, :-1][keep]).float()
        cap = getattr(base.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        lm = F.cross_entropy(logits, targets[keep])
        perturbed = decoder(inputs_embeds=embeds + delta, attention_mask=attention_mask,
                            output_hidden_states=True, use_cache=False)
        return lm + self.alpha * consistency(perturbed.hidden_states, attention_mask)


def apply(ctx: Context) -> Outcome:
    s = ctx.cfg.safety
    return sft.apply(ctx, method="crow",
                     objective=lambda model: CrowLoss(model, float(s.alpha), float(s.epsilon)))
