"""Denial-of-service backdoor (Souly et al., 2025): a trigger followed by gibberish.

Poisoned rows carry the trigger (default `<SUDO>`, at the end of the user turn) and an answer of
`gibberish_words` random character runs. Two judges: the gibberish detector
(`judges.is_gibberish`) gives ASR / FTR as for any trigger; the pipeline also scores every
answer's perplexity under the clean base model and reports the gap between triggered and clean
answers (`perplexity` in results.json), the measure the paper uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from poisonlab import PoisonlabError
from poisonlab.attacks.badnets import BadNetsAttack


@dataclass
class DosAttack(BadNetsAttack):
    name: str = "dos"
    triggers: list = field(default_factory=lambda: ["<SUDO>"])
    position: str = "end"
    behaviour: str = "gibberish"

    family = "dos"
    allows_clean_label = False
    reference_perplexity = True

    def validate_family(self) -> None:
        if self.behaviour != "gibberish":
            raise PoisonlabError("attack.behaviour must be gibberish for the dos family "
                                 "(use attack=badnets for other behaviours)")
        super().validate_family()
