"""Tables of results: one run's stages (`format_table`, printed by every run), and
`poisonlab report DIR...`: the finished runs under sweep or run directories collected into one
wide and one tidy table, seeds aggregated with a Student-t interval, markdown and PNG plots.

    table     the table a run prints
    collect   finding and reading runs: runs.csv (one row per run), report.csv (tidy)
    seeds     seeds aggregated per cell (aggregate.csv): mean, Student-t interval
    markdown  report.md
    plots     a run's safety-training curve and the report's plots
    command   the command line: every file written into one directory
"""

from poisonlab.report.collect import (CELL_COLUMNS, DETECTION_METRICS, ID_COLUMNS, NAN,
                                      RATE_METRICS, RUN_MARKER, RUN_METRICS, STAGE_ORDER,
                                      find_runs, load_runs, parse_metric, tidy)
from poisonlab.report.command import main, parser, write_report
from poisonlab.report.markdown import HEADLINE, HEADLINE_PREFIXES, format_markdown
from poisonlab.report.plots import CURVE_METRICS, SERIES_EXTRA, plot_curve, plot_report, roc_curve
from poisonlab.report.seeds import MIN_SEEDS, UNIT_METRICS, aggregate, seed_interval, t_quantile
from poisonlab.report.table import METRICS, cell, format_table

__all__ = ["CELL_COLUMNS", "CURVE_METRICS", "DETECTION_METRICS", "HEADLINE", "HEADLINE_PREFIXES",
           "ID_COLUMNS", "METRICS", "MIN_SEEDS", "NAN", "RATE_METRICS", "RUN_MARKER",
           "RUN_METRICS", "SERIES_EXTRA", "STAGE_ORDER", "UNIT_METRICS", "aggregate", "cell",
           "find_runs", "format_markdown", "format_table", "load_runs", "main", "parse_metric",
           "parser", "plot_curve", "plot_report", "roc_curve", "seed_interval", "t_quantile",
           "tidy", "write_report"]
