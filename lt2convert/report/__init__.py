"""`report`: a leaderboard (Markdown and a self-contained HTML page with plots) from lm-eval result files, the
published baselines in evals/baselines/ and `bench --json` output.

Comparison rule (docs: evaluation conventions): two numbers share a column, and are ranked and bolded together,
only when task, shots, metric and filter all match. A result of a baseline's benchmark under other shots, metric
or filter gets its own column and a † footnote saying why it is not comparable; it is never silently compared.
A baseline whose metric the paper does not state (`metric_certain: false`) is compared under the assumed metric
and its column carries a ‡ footnote.

lm-eval 0.4 results layout read here: `results[task]["<metric>,<filter>"]` (and `"<metric>_stderr,<filter>"`),
`n-shot[task]`, `configs[task]["num_fewshot"]`, `higher_is_better[task][metric]`, `group_subtasks`, `versions`,
`model_name` / `config.model_args`; `lm_eval --output_path DIR` writes `DIR/<model>/results_<date>.json`.
"""

from __future__ import annotations

from pathlib import Path

from lt2convert.errors import ConfigError
from lt2convert.io.outputs import REPORT_MARKER, atomic_directory
from lt2convert.report.figures import exit_sweep_plots, make_plots
from lt2convert.report.inputs import load_baselines, load_bench, load_exit_sweep, load_runs, load_training
from lt2convert.report.leaderboard import (
    Column,
    MetricKept,
    build_leaderboard,
    crossover,
    headlines,
    pick_teacher,
    quality_score,
)
from lt2convert.report.render import fmt, render_html, render_markdown

# Modules: inputs (readers), leaderboard (columns, story), figures (plots), render (Markdown, HTML).
__all__ = ["Column", "MetricKept", "build_leaderboard", "crossover", "fmt", "load_runs", "quality_score", "report"]

# ---------------------------------------------------------------------------------------------------------------
# The command


def write_report(
    inputs: list,
    baselines: str | Path | None = "ouro-paper",
    bench: list | None = None,
    output: str | Path = "report",
    overwrite: bool = True,
    *,
    runs: list | None = None,
    teacher: str | None = None,
    exit_sweep: str | Path | None = None,
) -> Path:
    """Write OUTPUT/leaderboard.md and a self-contained OUTPUT/index.html (inline CSS, PNG plots as data URIs)
    from lm-eval results (files or folders), published baselines, `bench --json` files and distill run folders
    (`runs`, for the training curves), and an adaptive-exit sweep (`exit_sweep`: model name -> `exit_sweep.sweep_model`
    result, for the speed–quality curve and its table). Each other run is compared with `teacher` (default: a run named
    'teacher', else the first input's model). The folder is built in a temporary sibling and renamed into place,
    so a failed run leaves no half-written report."""
    models = load_runs(list(inputs)) if inputs else []
    table = load_baselines(baselines)
    benches = load_bench(list(bench or []))
    training = load_training(list(runs or []))
    sweeps = load_exit_sweep(exit_sweep)
    if not models and not table:
        raise ConfigError("nothing to report: give lm-eval results or --baselines")
    board = build_leaderboard(models, table)
    chosen = pick_teacher(models, teacher)
    story = headlines(board, models, chosen, benches)
    qualities = {chosen: 100.0, **{h.student: h.quality for h in story}} if story else {}
    plots = make_plots(board, benches, story, chosen, training)
    from lt2convert.report.plots import model_colors

    colors = model_colors(chosen, [m.name for m in models])
    plots |= exit_sweep_plots(sweeps, colors)

    output = Path(output)
    with atomic_directory(output, overwrite=overwrite, kind="report") as staging:
        (staging / "leaderboard.md").write_text(render_markdown(board, plots, story, benches, qualities, sweeps),
                                                encoding="utf-8")
        (staging / "index.html").write_text(render_html(board, plots, story, benches, qualities, colors, sweeps),
                                            encoding="utf-8")
        (staging / REPORT_MARKER).write_text("written by lt2convert report\n", encoding="utf-8")
    return output
