"""Names a reader sees in tables and figures: metrics, stages, defences and detectors in plain
words, and the one-line definitions printed under the tables (DER, utility change)."""

from __future__ import annotations

import math

METRIC_LABELS = {"asr": "ASR", "ftr_clean": "FTR clean", "ftr_near": "FTR near",
                 "clean_utility": "clean utility"}
STAGE_LABELS = {"base": "base model", "clean_ft": "clean fine-tune (control)",
                "poisoned": "poisoned", "filtered": "filtered + retrained",
                "after_safety": "after defence"}
# what a removal defence does, where its name is also a detector's (`onion` is both: a detector
# that scores training rows, and an inference-time defence that edits the prompt)
DEFENSE_KINDS = {"onion": "input filter"}

DER_NOTE = ("DER: defence effectiveness rating = (max(0, ΔASR) − max(0, Δutility) + 1) / 2, "
            "with ΔASR = ASR before − ASR after and Δutility = clean utility before − clean "
            "utility after (before: the poisoned model; after: the defended one). 1: backdoor "
            "removed at no utility cost; 0.5: no net effect; 0: utility lost, nothing removed "
            "(poisonlab/defenses/metrics.py).")
DER_SHORT = ("DER = defence effectiveness rating, (max(0, ΔASR) − max(0, Δutility) + 1) / 2 "
             "against the poisoned model: 1 removed at no utility cost, 0.5 no net effect, 0 "
             "utility lost and nothing removed")
UTILITY_CHANGE_NOTE = ("utility change: clean utility of the poisoned model minus that of the "
                       "reference, paired on the same prompts; negative = utility lost. The "
                       "reference is the control fine-tune (the same rows with every poison "
                       "replaced by its clean original) where the run has one, else the base "
                       "model (marked \"vs base\").")


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def detector_label(name: str) -> str:
    """A detector's name, marked as the detector where a removal defence has the same name."""
    from poisonlab.defenses import METHODS

    return f"{name} (detector)" if name in METHODS else name


def defense_label(safety=None, filter_detector=None) -> str | None:
    """The defence of a run: its removal method (`safety.method`), or filter then retrain
    (`filter.detector`); None without one. A method named like a detector says what it is."""
    if not _missing(safety) and safety != "none":
        kind = DEFENSE_KINDS.get(safety)
        return f"{safety} ({kind})" if kind else str(safety)
    if not _missing(filter_detector):
        return f"filter + retrain ({detector_label(str(filter_detector))})"
    return None


def stage_label(stage: str) -> str:
    return STAGE_LABELS.get(stage, stage)


def plain(v, escape: bool = True) -> str:
    """A value as text: '-' for a missing one, a whole float as an integer, '|' escaped for a
    markdown table (`escape`)."""
    if _missing(v):
        return "-"
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return str(v).replace("|", "\\|") if escape else str(v)


def distinguishing(rows, order, own=None) -> list[str]:
    """The fewest columns of `order` that tell `rows` (mappings) apart, with `own` (a key of
    each row's own, such as its detector, or None): each column in turn, taken when it splits
    rows that still look the same. Returned in the order of `order`."""
    rows = list(rows)
    own = list(own) if own is not None else [None] * len(rows)
    chosen: list[str] = []

    def distinct(columns) -> int:
        return len({(tuple(plain(r.get(c)) for c in columns), o) for r, o in zip(rows, own)})

    for c in order:
        now = distinct(chosen)
        if now == len(rows):
            break
        if distinct([*chosen, c]) > now:
            chosen.append(c)
    return [c for c in order if c in chosen]
