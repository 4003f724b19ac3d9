"""`poisonlab report DIR...` (also `python -m poisonlab.report`): every file of the report,
tables, report.md and figures (PNG by default; `--format png,pdf,svg`), written into one
directory."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from poisonlab import PoisonlabError
from poisonlab.report.collect import load_runs, tidy
from poisonlab.report.markdown import format_markdown
from poisonlab.report.plots import FORMATS, caption, parse_formats, plot_report
from poisonlab.report.seeds import R50_KEY, aggregate


def write_report(paths, out_dir, formats=("png",)) -> dict[str, Path]:
    """runs.csv (wide), report.csv (tidy), aggregate.csv (seeds), report.md and the figures,
    each in every format of `formats` (png, pdf, svg), into out_dir; returns them by file
    name."""
    formats = parse_formats(formats)
    df = load_runs(paths)
    agg = aggregate(df)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {name: out / name for name in ("runs.csv", "report.csv", "aggregate.csv",
                                           "report.md")}
    df.to_csv(files["runs.csv"], index=False)
    tidy(df).to_csv(files["report.csv"], index=False)
    # R50's record ({value, ci_low, ci_high, n_seeds, ...}) as JSON text
    (agg.assign(**{R50_KEY: agg[R50_KEY].map(lambda d: json.dumps(d) if d else "")})
     if R50_KEY in agg else agg).to_csv(files["aggregate.csv"], index=False)
    figures = plot_report(df, out, formats, agg=agg)
    text = format_markdown(agg)
    stems = list(dict.fromkeys(p.stem for p in figures))
    if stems:
        text += "\n\n## Figures\n\n" + "\n".join(
            f"* {', '.join(f'`{s}.{f}`' for f in formats)}: {caption(s)}" for s in stems)
    lives = life_sections(df, out, formats)
    for stem, block in lives:
        text += f"\n\n## The life of {stem[len('life_'):]}\n\n```\n{block}\n```\n\n" + \
            f"{', '.join(f'`{stem}.{f}`' for f in formats)}: {caption(stem)}"
        files.update({f"{stem}.{f}": out / f"{stem}.{f}" for f in formats})
    files["report.md"].write_text(text + "\n", encoding="utf-8")
    files.update({p.name: p for p in figures})
    return files


def life_sections(df, out: Path, formats) -> list[tuple[str, str]]:
    """(figure stem, table) of each lifecycle run among the runs: `life_<run>.<format>`
    drawn into `out` (the run's directory name, its parent's where names repeat)."""
    from poisonlab.report.plots import life_figure, save_figure
    from poisonlab.report.table import format_life

    sections = []
    for run_dir in df["run_dir"] if "run_dir" in df else []:
        results = Path(run_dir) / "results.json"
        life = json.loads(results.read_text()).get("lifecycle") if results.is_file() else None
        if not life:
            continue
        stem = "life_" + "_".join(Path(run_dir).parts[-2:])
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)
        save_figure(life_figure(life, Path(run_dir).name), out / stem, formats)
        sections.append((stem, format_life(life)))
    return sections


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="poisonlab report",
        description="Collect the finished runs under sweep or run directories: tables "
                    "(runs.csv, report.csv, aggregate.csv), report.md and figures.")
    p.add_argument("dirs", nargs="+", metavar="DIR",
                   help="a run directory, a sweep directory (multirun/...) or any parent")
    p.add_argument("--out", help="output directory (default: <first DIR>/report)")
    p.add_argument("--format", default="png", metavar="FORMATS",
                   help=f"figure formats, comma-separated, of {', '.join(FORMATS)} "
                        "(default: png); each figure is written in each")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("fontTools").setLevel(logging.WARNING)  # PDF font subsetting chatter
    out = Path(args.out) if args.out else Path(args.dirs[0]) / "report"
    try:
        files = write_report(args.dirs, out, parse_formats(args.format))
    except PoisonlabError as e:
        print(f"poisonlab: error: {e}", file=sys.stderr)
        return 2
    print(files["report.md"].read_text(encoding="utf-8"))
    print("wrote:\n" + "\n".join(f"  {p}" for p in files.values()))
    return 0
