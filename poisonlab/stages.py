"""Kept for imports written before the pipeline package: the stage store lives in
`poisonlab.pipeline.store`, stage keys in `poisonlab.pipeline.keys`."""

from poisonlab.pipeline.keys import code_digest, digest  # noqa: F401
from poisonlab.pipeline.store import STAGES, StageStore, Stages  # noqa: F401
