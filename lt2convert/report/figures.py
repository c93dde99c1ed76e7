"""The plots of a report, as PNG bytes by name (drawn by lt2convert.report.plots)."""

from __future__ import annotations

from lt2convert.report.inputs import PERCENT_METRICS
from lt2convert.report.leaderboard import Headline, bench_row, normalise, primary_columns

# ---------------------------------------------------------------------------------------------------------------
# Plots


def bench_label(row: dict, bench: dict, many: bool) -> str:
    label = row["name"]
    if many:
        where = bench.get("device_name", bench.get("device", "?"))
        label += f" [{where}, {bench.get('dtype', '?')}, batch {bench.get('batch', '?')}]"
    return label


def make_plots(board: dict, benches: list[dict], story: list[Headline], teacher: str | None,
               training: dict[str, list[dict]]) -> dict[str, bytes]:
    from lt2convert.report import plots as draw

    runs = [m.name for m in board["models"] if m.kind == "run"]
    colors = draw.model_colors(teacher, runs)
    plots: dict[str, bytes | None] = {}
    panels = []
    for column in primary_columns(board):
        ordered = sorted(column.values.items(), key=lambda kv: (kv[0] not in runs, runs.index(kv[0])
                                                                if kv[0] in runs else 0))
        key = column.key
        panels.append({
            "title": column.label if column.baseline else key.task,
            "subtitle": f"{key.shots}-shot {key.metric}" + ("" if key.filter in (None, "none") else f" ({key.filter})")
            + (" %" if key.metric in PERCENT_METRICS else ""),
            "higher_is_better": column.higher_is_better,
            "bars": [(name, cell.value, cell.stderr, name in runs) for name, cell in ordered],
        })
    plots["scores_by_task"] = draw.score_bars(panels, colors)
    plots["training_curves"] = draw.training_curves(training)

    many = len(benches) > 1
    lines = []
    for bench in benches:
        for row in bench["models"]:
            points = sorted((int(k), v) for k, v in row.get("decode", {}).items())
            if not points:
                continue
            match = next((r for r in runs if normalise(r) == normalise(row["name"])), None)
            lines.append({
                "label": bench_label(row, bench, many),
                "color": colors.get(match, draw.STUDENT_COLORS[len(lines) % len(draw.STUDENT_COLORS)]),
                "contexts": [c for c, _ in points],
                "tokens_per_s": [v["tokens_per_s"] for _, v in points],
                "cache_bytes": [v["cache_bytes"] for _, v in points],
            })
    marks = [(h.student, h.speed.crossover_at) for h in story
             if h.speed and h.speed.crossover_at and h.speed.crossover_at > h.speed.bench["contexts"][0]]
    if benches:
        batches = ", ".join(str(b) for b in dict.fromkeys(bench.get("batch") for bench in benches))
        title = f"{benches[0].get('device_name', '?')}, {benches[0].get('dtype', '?')}, batch {batches}"
        plots.update(draw.speed_and_cache(lines, marks, title))

    speeds = [h for h in story if h.speed]
    if speeds:
        context = speeds[0].speed.context
        bench = speeds[0].speed.bench
        points = [{"name": teacher, "color": colors[teacher], "quality": 100.0,
                   "speed": bench_row(bench, teacher)["decode"][str(context)]["tokens_per_s"]}]
        for h in speeds:
            row = bench_row(bench, h.student)
            if row is not None and str(context) in row["decode"]:
                points.append({"name": h.student, "color": colors.get(h.student), "quality": h.quality,
                               "speed": row["decode"][str(context)]["tokens_per_s"]})
        plots["quality_vs_decode_speed"] = draw.quality_vs_speed(points, context)
    return {name: png for name, png in plots.items() if png}


def exit_sweep_plots(sweeps: dict[str, dict] | None, colors: dict[str, str]) -> dict[str, bytes]:
    """The adaptive-exit speed–quality curve, one series per swept model (teacher first), when there is a sweep."""
    from lt2convert.report import plots as draw

    series = []
    for i, (name, sweep) in enumerate((sweeps or {}).items()):
        rows = sorted(sweep["rows"], key=lambda row: row["threshold"])
        series.append({
            "name": name,
            "color": colors.get(name, draw.STUDENT_COLORS[i % len(draw.STUDENT_COLORS)]),
            "thresholds": [row["threshold"] for row in rows],
            "speed": [row["speed_vs_every_step"] for row in rows],
            "perplexity": [row["perplexity_vs_every_step"] for row in rows],
        })
    png = draw.exit_speed_quality(series)
    return {"exit_speed_quality": png} if png else {}
