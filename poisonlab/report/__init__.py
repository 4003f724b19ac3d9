"""Tables and figures of results: one run's stages (`format_table`, printed by every run;
`plot_stages`, `plot_curve`, drawn into its directory), and `poisonlab report DIR...`: the
finished runs under sweep or run directories collected into one wide and one tidy table, seeds
aggregated with an interval over seeds, report.md and the figures (PNG, PDF, SVG).

    table     the table a run prints
    collect   finding and reading runs: runs.csv (one row per run), report.csv (tidy)
    seeds     seeds aggregated per cell (aggregate.csv): mean, interval over seeds; R50,
              right-censored
    markdown  report.md: poisoning, removal, detection and published tables
    plots     a run's figures and the report's
    labels    the names tables and figures use (defences, detectors, DER)
    command   the command line: every file written into one directory
"""

from poisonlab.report.collect import (ATTACK_COLUMNS, CELL_COLUMNS, DETECTION_METRICS,
                                      ID_COLUMNS, NAN, RATE_METRICS, RUN_MARKER, RUN_METRICS,
                                      STAGE_ORDER, UTILITY_CHANGE, find_runs, load_runs,
                                      parse_metric, removal_of, tidy, utility_change_of)
from poisonlab.report.command import main, parser, write_report
from poisonlab.report.labels import DER_NOTE, defense_label, detector_label
from poisonlab.report.markdown import format_markdown
from poisonlab.report.plots import (CURVE_METRICS, FORMATS, SERIES_EXTRA, curve_figure,
                                    life_figure, plot_curve, plot_life, plot_report,
                                    plot_stages, report_figures, roc_curve, stages_figure)
from poisonlab.report.seeds import (MIN_SEEDS, R50_KEY, UNIT_METRICS, aggregate, r50_over_seeds,
                                    seed_interval, t_quantile)
from poisonlab.report.table import METRICS, cell, format_life, format_table

__all__ = ["ATTACK_COLUMNS", "CELL_COLUMNS", "CURVE_METRICS", "DER_NOTE", "DETECTION_METRICS",
           "FORMATS", "ID_COLUMNS", "METRICS", "MIN_SEEDS", "NAN", "R50_KEY", "RATE_METRICS",
           "RUN_MARKER", "RUN_METRICS", "SERIES_EXTRA", "STAGE_ORDER", "UNIT_METRICS",
           "UTILITY_CHANGE", "aggregate", "cell", "curve_figure", "defense_label",
           "detector_label", "find_runs", "format_life", "format_markdown", "format_table",
           "life_figure", "load_runs", "main", "parse_metric", "parser", "plot_curve",
           "plot_life", "plot_report", "plot_stages", "r50_over_seeds",
           "removal_of", "report_figures", "roc_curve", "seed_interval", "stages_figure",
           "t_quantile", "tidy", "utility_change_of", "write_report"]
