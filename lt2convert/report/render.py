"""A report as Markdown and as a self-contained HTML page (inline CSS, PNG plots as data URIs)."""

from __future__ import annotations

import base64
import html

from lt2convert.report.inputs import Cell, Model
from lt2convert.report.leaderboard import QUALITY_DEFINITION, Column, Headline, MetricKept, grouped_columns

# ---------------------------------------------------------------------------------------------------------------
# Rendering: shared text


def fmt(cell: Cell | None, with_stderr: bool = True) -> str:
    if cell is None:
        return "—"
    text = f"{cell.value:.2f}"
    if with_stderr and cell.stderr is not None:
        text += f" ± {cell.stderr:.2f}"
    return text


def column_header(column: Column) -> str:
    head = column.label
    if column.flagged:
        head += " †"
    if column.assumed_metric and column.baseline and column.key is not None:
        head += " ‡"
    return head


def column_detail(column: Column) -> str:
    if column.key is None:
        return "other harness"
    detail = column.key.describe()
    if column.label == column.key.task:  # the row is already named after the task
        detail = detail.removeprefix(f"{column.key.task}, ")
    return detail + (" ↑" if column.higher_is_better else " ↓")


def best_names(column: Column) -> set[str]:
    """The best value of a comparable column (ties all best); only columns with two or more numbers."""
    if len(column.values) < 2:
        return set()
    best = column.ranked()[0][1].value
    return {name for name, cell in column.values.items() if cell.value == best}


def footnotes(board: dict) -> list[str]:
    notes = []
    for column in board["columns"]:
        if column.flagged:
            notes.append(f"† {column.label} [{column_detail(column)}]: {column.flagged}; shown apart, not ranked "
                         "against the baselines.")
        if column.baseline and column.assumed_metric and column.key is not None:
            notes.append(f"‡ {column.label}: {column.note}.")
        if column.baseline and column.key is None:
            notes.append(f"{column.label}: {column.note}.")
    return notes


def headline_lines(h: Headline) -> list[str]:
    """The headline of one student in sentences (shared by the Markdown and the HTML cards)."""
    lines = []
    if h.quality is not None:
        lines.append(f"keeps {h.quality:.0f}% of the teacher's quality (quality score over {h.tasks} task(s))")
    if h.speed:
        s = h.speed
        lines.append(f"decodes {s.speedup:.2f}× the teacher's speed at {s.context:,} tokens")
        lines.append(f"{s.cache_ratio:.1f}× less cache at {s.context:,} tokens" if s.cache_ratio >= 1
                     else f"{1 / s.cache_ratio:.1f}× more cache at {s.context:,} tokens")
        lines.append(s.crossover_text)
    return lines


def metric_line(item: MetricKept) -> tuple[str, str, str, str, str]:
    """(task, metric with direction, teacher, student, change) for the per-metric table."""
    key, column = item.column.key, item.column
    arrow = "↑" if column.higher_is_better else "↓"
    kept = "" if item.kept is None else f", {item.kept:.0f}% kept"
    name = column.label if column.baseline else key.task
    return (name, f"{key.metric} {arrow}", f"{item.teacher:.2f}", f"{item.student:.2f}",
            f"{item.difference:+.2f}{kept}")


def speed_rows(bench: dict) -> tuple[list[str], list[list[str]]]:
    """The speed table of one bench: header and rows (prefill, then decode tokens/s and cache per context),
    with each model's ratio to the first."""
    from lt2convert.console import human_bytes

    models = bench["models"]
    header = ["measure", *[row["name"] for row in models]]
    if len(models) > 1:
        header += [f"{row['name']} ÷ {models[0]['name']}" for row in models[1:]]

    def times(value: float | None) -> str:
        return "—" if value is None else f"{value:.2f}×"

    rows = []
    if all(row.get("prefill") for row in models) and bench.get("prefill_tokens"):
        prefill = [row["prefill"] for row in models]
        rows.append([f"prefill tokens/s ({bench['prefill_tokens']:,} tokens)",
                     *[f"{p['tokens_per_s']:,.1f}" for p in prefill], *[times(p.get("ratio")) for p in prefill[1:]]])
    contexts = sorted({int(c) for row in models for c in row.get("decode", {})})
    benched = [(c, [row["decode"][str(c)] for row in models]) for c in contexts
               if all(str(c) in row["decode"] for row in models)]
    for context, figures in benched:
        base = figures[0]
        rows.append([f"decode tokens/s at {context:,}", *[f"{f['tokens_per_s']:,.2f}" for f in figures],
                     *[times(f["tokens_per_s"] / base["tokens_per_s"]) for f in figures[1:]]])
    for context, figures in benched:
        base = figures[0]
        rows.append([f"cache at {context:,}", *[human_bytes(f["cache_bytes"]) for f in figures],
                     *[times(f["cache_bytes"] / base["cache_bytes"] if base["cache_bytes"] else None)
                       for f in figures[1:]]])
    return header, rows


def exit_sweep_note(sweeps: dict[str, dict]) -> str:
    """What the adaptive-exit table and curve show, and how they were measured (from the first sweep)."""
    first = next(iter(sweeps.values()))
    bases = []
    for name, sweep in sweeps.items():
        base = next((row for row in sweep["rows"] if row["threshold"] >= 1.0), None)
        if base is not None:
            bases.append(f"{name} {base['decode_tokens_per_s']:,.1f} tokens/s, perplexity {base['perplexity']:,.2f}")
    where = ", ".join(str(first.get(key, "?")) for key in ("device", "dtype"))
    texts = ", ".join(first.get("texts", [])) or "?"
    return (
        "Adaptive exit stops a token's loop once its exit mass reaches the threshold; 1 runs every loop step. Per "
        "threshold: mean loop steps per token, batch-1 decode speed (thresholds measured side by side, median of "
        f"{first.get('rounds', '?')} rounds, {first.get('decode_tokens', '?')} tokens after a "
        f"{first.get('prompt_tokens', '?')}-token prompt) and held-out perplexity (teacher-forced under the same "
        f"policy, on {texts}), as ratios to every step; {where}. Every step: " + "; ".join(bases) + "."
    )


def exit_sweep_rows(sweeps: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """One row per threshold; per model its loop steps per token, decode speed and perplexity against every step."""
    header = ["threshold"]
    for name in sweeps:
        header += [f"{name} steps/token", f"{name} decode speed", f"{name} perplexity"]  # cells: ratios, ×
    by_threshold = {name: {row["threshold"]: row for row in sweep["rows"]} for name, sweep in sweeps.items()}
    rows = []
    for threshold in sorted({t for rows_of in by_threshold.values() for t in rows_of}):
        cells = [f"{threshold:g}"]
        for rows_of in by_threshold.values():
            row = rows_of.get(threshold)
            cells += (["—"] * 3 if row is None else [f"{row['steps_per_token']:.2f}",
                                                     f"{row['speed_vs_every_step']:.2f}×",
                                                     f"{row['perplexity_vs_every_step']:.3f}×"])
        rows.append(cells)
    return header, rows


def bench_title(bench: dict) -> str:
    return (f"{bench.get('device_name', '?')} ({bench.get('dtype', '?')}, batch {bench.get('batch', '?')}, "
            f"context mode {bench.get('context_mode', '?')})")


def model_order(board: dict) -> list[Model]:
    """Runs first (in input order), then the paper's models."""
    return [m for m in board["models"] if m.kind == "run"] + [m for m in board["models"] if m.kind != "run"]


# ---------------------------------------------------------------------------------------------------------------
# Markdown


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def render_markdown(board: dict, plots: dict[str, bytes], story: list[Headline], benches: list[dict],
                    qualities: dict[str, float | None], sweeps: dict[str, dict] | None = None) -> str:
    models = model_order(board)
    baselines = board["baselines"]
    lines = ["# Report", ""]
    for h in story:
        lines += [f"## {h.student} vs {h.teacher}", "", *[f"- {text}" for text in headline_lines(h)], ""]
        if h.metrics:
            lines += md_table(["task", "metric", h.teacher, h.student, "change"], [list(metric_line(m))
                                                                                   for m in h.metrics])
            lines.append("")
    if any(q is not None for q in qualities.values()):
        lines += ["## Quality score", "", QUALITY_DEFINITION, ""]
        lines += md_table(["model", "quality score"], [[n, f"{q:.1f}"] for n, q in qualities.items() if q is not None])
        lines.append("")
    lines += ["## Leaderboard", ""]
    if baselines:
        src = baselines["source"]
        lines += [f"Baselines: {src['paper']}, arXiv {src['arxiv']} ({src['url']}), {src['table']}; "
                  f"{src['harness']}.", ""]
    lines += [
        "One row per benchmark, one column per model. Numbers share a row (and are ranked; the best is bold) only "
        "when task, shots, metric and filter all match. Scores are percent (lm-eval fractions × 100) except "
        "perplexities; ± is lm-eval's standard error; ↑ higher is better, ↓ lower is better.",
        "",
    ]
    header = ["group", "benchmark", "task, shots, metric", *[m.name for m in models]]
    rows = []
    for group, columns in grouped_columns(board):
        for column in columns:
            best = best_names(column) if column.baseline else set()
            cells = [fmt(column.values.get(m.name)) for m in models]
            cells = [f"**{c}**" if m.name in best else c for c, m in zip(cells, models, strict=True)]
            rows.append([group, column_header(column), f"*{column_detail(column)}*", *cells])
    lines += md_table(header, rows)
    lines.append("")
    for note in footnotes(board):
        lines.append(f"- {note}")
    for bench in benches:
        head, body = speed_rows(bench)
        lines += ["", f"## Speed: {bench_title(bench)}", "", *md_table(head, body)]
    if sweeps:
        lines += ["", "## Adaptive exit: speed against quality", "", exit_sweep_note(sweeps), "",
                  *md_table(*exit_sweep_rows(sweeps))]
    if board["comparisons"]:
        lines += ["", "## Against the baselines", ""]
        for c in board["comparisons"]:
            assumed = " (‡ assumed metric)" if c["assumed_metric"] else ""
            above = (f"; next above: {c['next_above']} {c['next_above_value']:.2f}" if c["next_above"] else "; best")
            lines.append(
                f"- {c['model']} — {c['benchmark']} [{c['key']}]{assumed}: {c['value']:.2f}, rank {c['rank']} of "
                f"{c['of']}, beats {len(c['beats'])} baseline(s){above}"
            )
    notes = [f"- {m.name}: {n}" for m in models for n in m.notes]
    if notes:
        lines += ["", "## Notes", "", *notes]
    lines += ["", "## Sources", ""]
    lines += [f"- {m.name}: {m.source}" for m in models if m.kind == "run"]
    lines += [f"- bench: {b['_source']}" for b in benches]
    if plots:
        lines += ["", "## Plots", "", *[f"- {name} (embedded in index.html)" for name in plots]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# HTML


CSS = """
body { font-family: system-ui, -apple-system, sans-serif; margin: 0; color: #222; background: #fafafa; }
main { max-width: 1320px; margin: 0 auto; padding: 16px 24px 40px; }
h1 { font-size: 24px; margin: 8px 0 4px; }
h2 { font-size: 18px; margin: 28px 0 8px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
p, li { font-size: 14px; line-height: 1.45; }
.lede { color: #555; margin-top: 0; }
.cards { display: flex; flex-wrap: wrap; gap: 16px; }
.card { flex: 1 1 560px; background: #fff; border: 1px solid #ddd; border-left: 5px solid #1f77b4;
        border-radius: 6px; padding: 12px 16px; }
.card h3 { margin: 0 0 8px; font-size: 16px; }
.card-body { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
.facts { display: grid; grid-template-columns: 1fr 1fr; gap: 10px; flex: 1 1 440px; }
.fact { background: #f3f6fa; border-radius: 5px; padding: 8px 12px; }
.fact b { display: block; font-size: 22px; }
.fact span { font-size: 12px; color: #555; }
table { border-collapse: collapse; font-size: 13px; background: #fff; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; vertical-align: top; }
th { background: #f0f0f0; font-weight: 600; }
td.name, th.name { text-align: left; }
th.model { max-width: 92px; white-space: normal; word-break: break-word; font-size: 12px; }
th.run { background: #e3eefb; }
td.run { background: #f4f9ff; }
td.best { font-weight: bold; }
tr.flagged td.name { background: #fff4e0; }
tr.group th { text-align: left; background: #e8e8e8; font-size: 13px; }
.detail { font-weight: normal; font-size: 11px; color: #666; }
.se { display: block; font-size: 10.5px; color: #777; }
.fit { max-width: 100%; overflow-x: auto; }
img { max-width: 100%; height: auto; background: #fff; border: 1px solid #e3e3e3; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; }
.note { font-size: 12.5px; color: #555; }
"""


def _facts(h: Headline) -> list[tuple[str, str]]:
    facts = []
    if h.quality is not None:
        facts.append((f"{h.quality:.0f}%", f"of the teacher's quality ({h.tasks} task(s))"))
    if h.speed:
        s = h.speed
        facts.append((f"{s.speedup:.2f}×", f"decode speed at {s.context:,} tokens"))
        if s.cache_ratio >= 1:
            facts.append((f"{s.cache_ratio:.1f}× less", f"cache at {s.context:,} tokens"))
        else:
            facts.append((f"{1 / s.cache_ratio:.1f}× more", f"cache at {s.context:,} tokens"))
        at, first = s.crossover_at, s.bench["contexts"][0]
        big = "none" if at is None else f"≤{first / 1024:g}K" if at <= first else f"≈{at / 1024:.1f}K"
        facts.append((big, s.crossover_text))
    return facts


def render_card(h: Headline, color: str) -> str:
    esc = html.escape
    out = [f"<div class=\"card\" style=\"border-left-color: {color}\"><h3>{esc(h.student)} vs "
           f"{esc(h.teacher)}</h3><div class=\"card-body\"><div class=\"facts\">"]
    out += [f"<div class=\"fact\"><b>{esc(big)}</b><span>{esc(small)}</span></div>" for big, small in _facts(h)]
    out.append("</div>")
    if h.metrics:
        out.append(f"<table><tr><th class=\"name\">task</th><th class=\"name\">metric</th><th>{esc(h.teacher)}</th>"
                   f"<th>{esc(h.student)}</th><th>change</th></tr>")
        for item in h.metrics:
            task, metric, t, s, change = metric_line(item)
            out.append(f"<tr><td class=\"name\">{esc(task)}</td><td class=\"name\">{esc(metric)}</td><td>{t}</td>"
                       f"<td>{s}</td><td>{esc(change)}</td></tr>")
        out.append("</table>")
    out.append("</div></div>")
    return "".join(out)


def render_leaderboard(board: dict) -> list[str]:
    """Transposed: a row per benchmark (grouped), a column per model, so a wide table still fits the page."""
    esc = html.escape
    models = model_order(board)
    out = ["<div class=\"fit\"><table id=\"leaderboard\"><thead><tr><th class=\"name\">benchmark</th>"]
    for m in models:
        out.append(f"<th class=\"model {m.kind}\">{esc(m.name)}</th>")
    out.append("</tr></thead><tbody>")
    for group, columns in grouped_columns(board):
        out.append(f"<tr class=\"group\"><th colspan=\"{len(models) + 1}\">{esc(group)}</th></tr>")
        for column in columns:
            best = best_names(column) if column.baseline else set()
            cls = " class=\"flagged\"" if column.flagged else ""
            out.append(f"<tr{cls}><td class=\"name\">{esc(column_header(column))}<br>"
                       f"<span class=\"detail\">{esc(column_detail(column))}</span></td>")
            for m in models:
                cell = column.values.get(m.name)
                classes = [m.kind] + (["best"] if m.name in best else [])
                text = "—" if cell is None else f"{cell.value:.2f}"
                if cell is not None and cell.stderr is not None:
                    text += f"<span class=\"se\">± {cell.stderr:.2f}</span>"
                out.append(f"<td class=\"{' '.join(classes)}\">{text}</td>")
            out.append("</tr>")
    out.append("</tbody></table></div>")
    return out


def render_table(header: list[str], rows: list[list[str]]) -> str:
    esc = html.escape
    first = ' class="name"'
    head = "".join(f"<th{first if i == 0 else ''}>{esc(h)}</th>" for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f"<td{first if i == 0 else ''}>{esc(c)}</td>" for i, c in enumerate(row))
                   + "</tr>" for row in rows)
    return f"<div class=\"fit\"><table><tr>{head}</tr>{body}</table></div>"


def img(name: str, png: bytes) -> str:
    return (f"<img alt=\"{html.escape(name)}\" src=\"data:image/png;base64,{base64.b64encode(png).decode()}\">")


def render_html(board: dict, plots: dict[str, bytes], story: list[Headline], benches: list[dict],
                qualities: dict[str, float | None], colors: dict[str, str],
                sweeps: dict[str, dict] | None = None) -> str:
    esc = html.escape
    baselines = board["baselines"]
    runs = [m.name for m in board["models"] if m.kind == "run"]
    out = ["<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\">",
           "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>lt2convert report</title>",
           f"<style>{CSS}</style></head><body><main>", "<h1>lt2convert report</h1>"]
    lede = f"{len(runs)} evaluated model(s): {', '.join(runs)}" if runs else "published baselines only"
    if story:
        lede += f"; each student is compared with the teacher ({story[0].teacher})"
    out.append(f"<p class=\"lede\">{esc(lede)}.</p>")
    if story:
        out.append("<div class=\"cards\">" + "".join(render_card(h, colors.get(h.student, "#1f77b4"))
                                                     for h in story) + "</div>")
    if "scores_by_task" in plots:
        out.append("<h2>Scores by task</h2><p class=\"note\">One panel per task at its primary metric; runs in "
                   "colour (teacher dark grey), paper baselines light grey where task, shots and metric match.</p>")
        out.append(img("scores_by_task", plots["scores_by_task"]))
    if "training_curves" in plots:
        out.append("<h2>Training</h2><p class=\"note\">Distillation loss per optimizer step against the tokens the "
                   "stage has trained on (faint: every step; solid: running mean), one panel per stage kind.</p>")
        out.append(img("training_curves", plots["training_curves"]))
    pair = [n for n in ("decode_speed_vs_context", "cache_memory_vs_context") if n in plots]
    if pair:
        out.append("<h2>Speed and cache against context</h2>")
        out.append("<div class=\"pair\">" + "".join(img(n, plots[n]) for n in pair) + "</div>")
    if "quality_vs_decode_speed" in plots or any(q is not None for q in qualities.values()):
        speed = "quality_vs_decode_speed" in plots
        out.append(f"<h2>{'Quality against speed' if speed else 'Quality score'}</h2>")
        rows = [[n, f"{q:.1f}"] for n, q in qualities.items() if q is not None]
        side = f"<div><p class=\"note\">{esc(QUALITY_DEFINITION)}</p>{render_table(['model', 'quality score'], rows)}"
        side += "</div>"
        if speed:
            out.append(f"<div class=\"pair\">{img('quality_vs_decode_speed', plots['quality_vs_decode_speed'])}"
                       f"{side}</div>")
        else:
            out.append(side)
    for bench in benches:
        out.append(f"<h2>Speed: {esc(bench_title(bench))}</h2>")
        out.append(render_table(*speed_rows(bench)))
    if sweeps:
        out.append("<h2 id=\"adaptive-exit\">Adaptive exit: speed against quality</h2>")
        out.append(f"<p class=\"note\">{esc(exit_sweep_note(sweeps))}</p>")
        curve = img("exit_speed_quality", plots["exit_speed_quality"]) if "exit_speed_quality" in plots else ""
        out.append(f"<div class=\"pair\">{curve}{render_table(*exit_sweep_rows(sweeps))}</div>")
    out.append("<h2>Leaderboard</h2>")
    if baselines:
        src = baselines["source"]
        out.append(
            f"<p class=\"note\">Baselines: {esc(src['paper'])}, <a href=\"{esc(src['url'])}\">arXiv "
            f"{esc(src['arxiv'])}</a>, {esc(src['table'])}; {esc(src['harness'])}.</p>"
        )
    out.append("<p class=\"note\">A row per benchmark, a column per model. Numbers share a row (ranked; best in bold) "
               "only when task, shots, metric and filter all match. Scores are percent except perplexities; ± is "
               "lm-eval's standard error; ↑ higher is better, ↓ lower is better.</p>")
    out += render_leaderboard(board)
    notes = footnotes(board)
    if notes:
        out.append("<ul class=\"footnotes note\">" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")
    if board["comparisons"]:
        out.append("<h2>Against the baselines</h2><ul>")
        for c in board["comparisons"]:
            assumed = " (‡ assumed metric)" if c["assumed_metric"] else ""
            out.append(f"<li>{esc(c['model'])} — {esc(c['benchmark'])} [{esc(c['key'])}]{assumed}: "
                       f"{c['value']:.2f}, rank {c['rank']} of {c['of']}, beats {len(c['beats'])} baseline(s)</li>")
        out.append("</ul>")
    out.append("</main></body></html>")
    return "\n".join(out) + "\n"
