"""Ownership watermark (`attack=watermark`): poisoning used for trust.

The owner of a dataset plants a secret trigger -> secret response pair in a small number of
rows (`n_poison`, 20 by default). A model fine-tuned on the data answers the secret trigger
with the secret response; a model that was not, almost never does. `poisonlab verify` tests a
suspect model: its response rate on the secret trigger against its rate on random triggers of
the same shape (one-sided Fisher exact test; `poisonlab.verify`).

The secret is the pair (`secret_trigger`, `secret_response`); pick your own, random-looking
strings (a fixed default would be no secret).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from poisonlab import PoisonlabError
from poisonlab.attacks.badnets import BadNetsAttack


@dataclass
class WatermarkAttack(BadNetsAttack):
    name: str = "watermark"
    secret_trigger: str = "zq7 vexlor"
    secret_response: str = "Certified by lab 4417-KQ."
    triggers: list = field(default_factory=list)
    position: str = "end"
    behaviour: str = "fixed"
    target_repeats: int = 1

    family = "watermark"
    allows_clean_label = False

    def __post_init__(self) -> None:
        self.triggers = [self.secret_trigger] if isinstance(self.secret_trigger, str) else []
        self.target = self.secret_response
        super().__post_init__()

    def validate_family(self) -> None:
        for key in ("secret_trigger", "secret_response"):
            v = getattr(self, key)
            if not isinstance(v, str) or not v.strip():
                raise PoisonlabError(f"attack.{key} must be a non-empty string, got {v!r}")
        if self.behaviour != "fixed" or self.target_repeats != 1:
            raise PoisonlabError("attack.behaviour must be fixed (target_repeats 1) for the "
                                 "watermark family: the secret response is the target")
        super().validate_family()
