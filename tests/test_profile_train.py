"""scripts/profile_train.py runs and prints a breakdown that adds up, for each precision."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_profile_script_on_the_micro_model(micro_path):
    out = subprocess.run(
        [sys.executable, "scripts/profile_train.py", "--model", "tiny:micro", "--steps", "2",
         "--batch", "4", "--top", "3", "--precisions", "float32,mixed_bf16:cast,mixed_bf16"],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=300).stdout
    blocks = re.findall(r"== (\S+): (\d+) tokens/s.*?\n((?:   \S.*\n)+)", out)
    assert [b[0] for b in blocks] == ["float32", "mixed_bf16:cast", "mixed_bf16"]
    for _, tps, body in blocks:
        assert int(tps) > 0
        shares = [float(x) for x in re.findall(r"\s([\d.]+)%", body)]
        assert "matmul" in body and abs(sum(shares) - 100) < 0.5
    # the held and the per-step cast loops train identically; autocast differs from fp32
    gaps = dict(re.findall(r"loss gap (\S+) vs float32: ([\d.]+)", out))
    assert float(gaps["mixed_bf16"]) == float(gaps["mixed_bf16:cast"]) > 0
