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

import base64
import html
import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

PERCENT_METRICS = {"acc", "acc_norm", "exact_match", "em", "f1", "mc1", "mc2", "contains", "mcc"}
SKIP_KEYS = {"alias", "name", "sample_len", "samples"}


# ---------------------------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class Key:
    """What must match for two numbers to be compared."""

    task: str
    shots: int | str | None
    metric: str | None
    filter: str | None

    def describe(self) -> str:
        shots = "?-shot" if self.shots is None else f"{self.shots}-shot"
        filt = "" if self.filter in (None, "none") else f", {self.filter}"
        return f"{self.task}, {shots}, {self.metric}{filt}"


@dataclass
class Cell:
    key: Key
    value: float  # percent for fraction metrics, raw otherwise
    stderr: float | None = None
    higher_is_better: bool = True
    version: str | None = None


@dataclass
class Model:
    name: str
    kind: str  # "run" (an lm-eval result) or "baseline"
    source: str
    cells: dict[Key, Cell] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def find_result_files(inputs: list) -> list[Path]:
    """Each input: an lm-eval results JSON file, or a folder searched recursively for results_*.json."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(path.rglob("results*.json"))
            if not found:
                raise ValueError(f"{path}: no lm-eval results_*.json file in this folder")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"{path}: no such file or folder")
    return files


def model_name_of(data: dict, path: Path) -> str:
    name = data.get("model_name")
    if not name:
        args = (data.get("config") or {}).get("model_args")
        if isinstance(args, dict):
            name = args.get("pretrained")
        elif isinstance(args, str):
            parts = dict(p.split("=", 1) for p in args.split(",") if "=" in p)
            name = parts.get("pretrained")
    return str(name or path.parent.name or path.stem)


def task_shots(data: dict, task: str) -> int | str | None:
    nshot = data.get("n-shot") or {}
    if task in nshot and nshot[task] is not None:
        return nshot[task]
    config = (data.get("configs") or {}).get(task) or {}
    if config.get("num_fewshot") is not None:
        return config["num_fewshot"]
    subtasks = (data.get("group_subtasks") or {}).get(task) or []
    shots = {task_shots(data, sub) for sub in subtasks} - {None}
    if len(shots) == 1:
        return shots.pop()
    return "mixed" if shots else None


def to_display(metric: str, value: float) -> float:
    return 100 * value if metric in PERCENT_METRICS else value


def read_lm_eval(path: Path) -> tuple[str, list[Cell]]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not JSON ({err})") from err
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise ValueError(f"{path}: not an lm-eval results file (no 'results' object)")
    cells = []
    for task, metrics in data["results"].items():
        shots = task_shots(data, task)
        better = (data.get("higher_is_better") or {}).get(task) or {}
        version = (data.get("versions") or {}).get(task)
        for name, value in metrics.items():
            if name in SKIP_KEYS or "," not in name or not isinstance(value, int | float) or isinstance(value, bool):
                continue
            metric, filt = name.split(",", 1)
            if metric.endswith("_stderr"):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            stderr = to_display(metric, stderr) if isinstance(stderr, int | float) else None
            cells.append(
                Cell(
                    Key(task, shots, metric, filt),
                    to_display(metric, float(value)),
                    stderr,
                    bool(better.get(metric, True)),
                    None if version is None else str(version),
                )
            )
    return model_name_of(data, path), cells


def load_runs(inputs: list) -> list[Model]:
    """One Model per model name; a later results file (by name: results_<ISO date>.json) replaces an earlier
    one's number for the same task, shots, metric and filter."""
    models: dict[str, Model] = {}
    for path in sorted(find_result_files(inputs), key=lambda p: (p.name, str(p))):
        name, cells = read_lm_eval(path)
        model = models.setdefault(name, Model(name, "run", str(path)))
        if model.source != str(path) and str(path) not in model.source:
            model.source += f", {path}"
        for cell in cells:
            if cell.key in model.cells:
                model.notes.append(f"{cell.key.describe()}: {path.name} replaces an earlier result")
            model.cells[cell.key] = cell
    return list(models.values())


def baselines_dir() -> Path:
    from lt2convert.evaluate import evals_dir

    return evals_dir() / "baselines"


def load_baselines(spec: str | Path | None) -> dict | None:
    """A name in evals/baselines/ (e.g. 'ouro-paper') or a path to such a JSON file; None or 'none': none."""
    if spec is None or str(spec) == "none":
        return None
    path = Path(spec)
    if not path.is_file():
        path = baselines_dir() / f"{spec}.json"
    if not path.is_file():
        known = ", ".join(p.stem for p in sorted(baselines_dir().glob("*.json"))) or "none found"
        raise ValueError(f"unknown baselines {spec!r} (known: {known})")
    return json.loads(path.read_text())


def load_bench(paths: list) -> list[dict]:
    benches = []
    for item in paths or []:
        path = Path(item)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: cannot read bench JSON ({err})") from err
        if not isinstance(data, dict) or not isinstance(data.get("models"), list):
            raise ValueError(f"{path}: not `lt2convert bench --json` output (no 'models' list)")
        data["_source"] = str(path)
        benches.append(data)
    return benches


# ---------------------------------------------------------------------------------------------------------------
# The leaderboard


@dataclass
class Column:
    label: str
    key: Key | None  # None: a baseline benchmark no lm-eval result can match (e.g. another harness)
    tasks: tuple[str, ...] = ()
    baseline: bool = False
    assumed_metric: bool = False
    note: str = ""
    flagged: str = ""  # why this column is not comparable with the baseline column of the same benchmark
    higher_is_better: bool = True
    values: dict[str, Cell] = field(default_factory=dict)  # model name -> cell

    def ranked(self) -> list[tuple[str, Cell]]:
        sign = -1 if self.higher_is_better else 1
        return sorted(self.values.items(), key=lambda kv: sign * kv[1].value)


def build_leaderboard(runs: list[Model], baselines: dict | None) -> dict:
    columns: list[Column] = []
    by_task: dict[str, Column] = {}
    related: dict[str, Column] = {}  # lm-eval tasks of a baseline's benchmark under another prompt
    models: list[Model] = list(runs)
    if baselines:
        for task in baselines["tasks"]:
            key = None
            if task.get("lm_eval_tasks"):
                key = Key(task["lm_eval_tasks"][0], task["shots"], task["metric"], task["filter"])
            column = Column(
                task["label"],
                key,
                tuple(task.get("lm_eval_tasks") or ()),
                baseline=True,
                assumed_metric=not task.get("metric_certain", False),
                note=task.get("metric_note", ""),
                higher_is_better=task.get("higher_is_better", True),
            )
            columns.append(column)
            for name in column.tasks:
                by_task[name] = column
            for name in task.get("other_lm_eval_tasks") or ():
                related[name] = column
            for entry in baselines["models"]:
                score = entry["scores"].get(task["key"])
                if score is not None:
                    column.values[entry["name"]] = Cell(key or Key(task["key"], None, None, None), float(score))
        for entry in baselines["models"]:
            models.append(Model(entry["name"], "baseline", f"{baselines['source']['paper']}, {baselines['name']}"))

    extra: dict[Key, Column] = {}
    for model in runs:
        for key, cell in model.cells.items():
            base = by_task.get(key.task)
            if base is not None and base.key is not None and key.shots == base.key.shots and (
                key.metric == base.key.metric and key.filter == base.key.filter
            ):
                base.values[model.name] = cell
                continue
            column = extra.get(key)
            if column is None:
                label = key.task
                flagged = ""
                if base is None and key.task in related:
                    near = related[key.task]
                    flagged = f"task {key.task} is not the prompt of the {near.label} baseline ({near.key.task})"
                    label = f"{near.label} ({key.task})"
                if base is not None:
                    reasons = []
                    if base.key is None:
                        reasons.append(f"the {base.label} baseline used another harness")
                    else:
                        if key.shots != base.key.shots:
                            reasons.append(f"{key.shots}-shot, not comparable to the {base.key.shots}-shot baseline")
                        if key.metric != base.key.metric:
                            reasons.append(f"metric {key.metric}, the baseline's is {base.key.metric}")
                        if key.filter != base.key.filter:
                            reasons.append(f"filter {key.filter}, the baseline's is {base.key.filter}")
                    flagged = "; ".join(reasons)
                    label = f"{base.label} ({key.task})"
                column = extra[key] = Column(label, key, (key.task,), flagged=flagged,
                                             higher_is_better=cell.higher_is_better)
            column.values[model.name] = cell
    columns.extend(sorted(extra.values(), key=lambda c: (c.key.task, str(c.key.shots), c.key.metric, c.key.filter)))
    columns = [c for c in columns if c.values]

    comparisons = []
    baseline_names = {m.name for m in models if m.kind == "baseline"}
    for model in runs:
        for column in columns:
            if not column.baseline or model.name not in column.values:
                continue
            ranked = column.ranked()
            rank = [name for name, _ in ranked].index(model.name) + 1
            cell = column.values[model.name]
            sign = 1 if column.higher_is_better else -1
            beaten = [
                n for n, c in column.values.items() if n in baseline_names and sign * (cell.value - c.value) > 0
            ]
            above = [(n, c) for n, c in ranked[: rank - 1]]
            comparisons.append(
                {
                    "model": model.name,
                    "benchmark": column.label,
                    "key": column.key.describe() if column.key else "",
                    "value": cell.value,
                    "stderr": cell.stderr,
                    "rank": rank,
                    "of": len(ranked),
                    "beats": beaten,
                    "next_above": above[-1][0] if above else None,
                    "next_above_value": above[-1][1].value if above else None,
                    "assumed_metric": column.assumed_metric,
                }
            )
    return {"columns": columns, "models": models, "comparisons": comparisons, "baselines": baselines}


# ---------------------------------------------------------------------------------------------------------------
# Rendering


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
    return column.key.describe()


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


def render_markdown(board: dict, plots: dict[str, str]) -> str:
    columns, models = board["columns"], board["models"]
    baselines = board["baselines"]
    lines = ["# Leaderboard", ""]
    if baselines:
        src = baselines["source"]
        lines += [
            f"Baselines: {src['paper']}, arXiv {src['arxiv']} ({src['url']}), {src['table']}; {src['harness']}.",
            "",
        ]
    lines += [
        "Numbers share a column (and are ranked; the best is bold) only when task, shots, metric and filter all "
        "match. Scores are percent (lm-eval fractions × 100) except perplexities; ± is lm-eval's standard error.",
        "",
    ]
    header = ["model", "kind"] + [column_header(c) for c in columns]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    lines.append("| | | " + " | ".join(f"*{column_detail(c)}*" for c in columns) + " |")
    best = {id(c): best_names(c) for c in columns}
    for model in models:
        cells = []
        for column in columns:
            text = fmt(column.values.get(model.name))
            if model.name in best[id(column)] and column.baseline:
                text = f"**{text}**"
            cells.append(text)
        lines.append("| " + " | ".join([model.name, model.kind, *cells]) + " |")
    lines.append("")
    for note in footnotes(board):
        lines.append(f"- {note}")
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
    if plots:
        lines += ["", "## Plots", "", *[f"- {name}.png (embedded in index.html)" for name in plots]]
    return "\n".join(lines) + "\n"


CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
td { white-space: nowrap; }
.scroll { overflow-x: auto; }
th { background: #f0f0f0; }
td.name, th.name { text-align: left; }
tr.run td { background: #eef6ff; }
td.best { font-weight: bold; }
th.flagged, td.flagged { background: #fff4e0; }
.detail { font-weight: normal; font-size: 11px; color: #555; }
img { max-width: 100%; border: 1px solid #ddd; margin: 1em 0; }
li { margin: 0.2em 0; }
"""


def render_html(board: dict, plots: dict[str, str]) -> str:
    esc = html.escape
    columns, models, baselines = board["columns"], board["models"], board["baselines"]
    out = ["<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\"><title>lt2convert leaderboard</title>",
           f"<style>{CSS}</style></head><body>", "<h1>Leaderboard</h1>"]
    if baselines:
        src = baselines["source"]
        out.append(
            f"<p>Baselines: {esc(src['paper'])}, <a href=\"{esc(src['url'])}\">arXiv {esc(src['arxiv'])}</a>, "
            f"{esc(src['table'])}; {esc(src['harness'])}.</p>"
        )
    out.append("<p>Numbers share a column (ranked; best in bold) only when task, shots, metric and filter all match. "
               "Scores are percent except perplexities; ± is lm-eval's standard error.</p>")
    out.append("<div class=\"scroll\"><table id=\"leaderboard\"><thead><tr>")
    out.append("<th class=\"name\">model</th><th class=\"name\">kind</th>")
    for column in columns:
        cls = " class=\"flagged\"" if column.flagged else ""
        out.append(f"<th{cls}>{esc(column_header(column))}<br><span class=\"detail\">"
                   f"{esc(column_detail(column))}</span></th>")
    out.append("</tr></thead><tbody>")
    best = {id(c): best_names(c) for c in columns}
    for model in models:
        out.append(f"<tr class=\"{model.kind}\"><td class=\"name\">{esc(model.name)}</td>"
                   f"<td class=\"name\">{model.kind}</td>")
        for column in columns:
            classes = []
            if column.flagged:
                classes.append("flagged")
            if column.baseline and model.name in best[id(column)]:
                classes.append("best")
            cls = f" class=\"{' '.join(classes)}\"" if classes else ""
            out.append(f"<td{cls}>{esc(fmt(column.values.get(model.name)))}</td>")
        out.append("</tr>")
    out.append("</tbody></table></div>")
    notes = footnotes(board)
    if notes:
        out.append("<ul class=\"footnotes\">" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")
    if board["comparisons"]:
        out.append("<h2>Against the baselines</h2><ul>")
        for c in board["comparisons"]:
            assumed = " (‡ assumed metric)" if c["assumed_metric"] else ""
            out.append(f"<li>{esc(c['model'])} — {esc(c['benchmark'])} [{esc(c['key'])}]{assumed}: "
                       f"{c['value']:.2f}, rank {c['rank']} of {c['of']}, beats {len(c['beats'])} baseline(s)</li>")
        out.append("</ul>")
    for name, png in plots.items():
        out.append(f"<h2>{esc(name.replace('_', ' '))}</h2>")
        out.append(f"<img alt=\"{esc(name)}\" src=\"data:image/png;base64,{base64.b64encode(png).decode()}\">")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Plots


def bench_label(row: dict, bench: dict, many: bool) -> str:
    label = row["name"]
    if many:
        label += f" [{bench.get('device_name', bench.get('device', '?'))}, {bench.get('dtype', '?')}]"
    return label


def normalise(name: str) -> str:
    name = name.replace(" (random init)", "").rstrip("/")
    return Path(name).name.lower()


def make_plots(board: dict, benches: list[dict]) -> dict[str, bytes]:
    if not benches:
        return {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots: dict[str, bytes] = {}
    many = len(benches) > 1

    def save(fig) -> bytes:
        buffer = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buffer, format="png", dpi=100)
        plt.close(fig)
        return buffer.getvalue()

    for name, field_name, ylabel, scale in (
        ("decode_speed_vs_context", "tokens_per_s", "decode tokens/s", 1),
        ("cache_memory_vs_context", "cache_bytes", "cache memory (MiB)", 1 / 2**20),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for bench in benches:
            for row in bench["models"]:
                points = sorted((int(k), v.get(field_name)) for k, v in row.get("decode", {}).items())
                points = [(c, v * scale) for c, v in points if v is not None]
                if points:
                    ax.plot(*zip(*points, strict=True), marker="o", label=bench_label(row, bench, many))
        ax.set_xscale("log", base=2)
        ticks = sorted({int(k) for bench in benches for row in bench["models"] for k in row.get("decode", {})})
        ax.set_xticks(ticks, [f"{t // 1024}K" if t % 1024 == 0 else str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} vs context (batch {benches[0].get('batch', '?')})")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        plots[name] = save(fig)

    # Quality vs decode speed: a point for each model with both a bench row and a score; one series per column.
    speeds = {}
    for bench in benches:
        for row in bench["models"]:
            decode = row.get("decode", {})
            if decode:
                longest = max(decode, key=int)
                speeds[normalise(row["name"])] = (decode[longest]["tokens_per_s"], int(longest))
    series = []
    for column in board["columns"]:
        if column.flagged:  # only numbers that are comparable with something are worth a quality axis
            continue
        points = [(speeds[normalise(n)], cell.value, n) for n, cell in column.values.items() if normalise(n) in speeds]
        if points:
            series.append((column, points))
    if series:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for column, points in series[:8]:
            xs = [p[0][0] for p in points]
            ys = [p[1] for p in points]
            ax.scatter(xs, ys, label=f"{column_header(column)} [{column_detail(column)}]")
            for (speed, _ctx), y, n in points:
                ax.annotate(n, (speed, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        contexts = sorted({p[0][1] for _, points in series for p in points})
        ax.set_xlabel(f"decode tokens/s at context {', '.join(map(str, contexts))}")
        ax.set_ylabel("score")
        ax.set_title("quality vs decode speed")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        plots["quality_vs_decode_speed"] = save(fig)
    return plots


# ---------------------------------------------------------------------------------------------------------------
# The command


def report(
    inputs: list,
    baselines: str | Path | None = "ouro-paper",
    bench: list | None = None,
    output: str | Path = "report",
    overwrite: bool = True,
) -> Path:
    """Write OUTPUT/leaderboard.md and a self-contained OUTPUT/index.html (inline CSS, PNG plots as data URIs)
    from lm-eval results (files or folders), published baselines and `bench --json` files. The folder is built
    in a temporary sibling and renamed into place, so a failed run leaves no half-written report."""
    runs = load_runs(list(inputs)) if inputs else []
    table = load_baselines(baselines)
    benches = load_bench(list(bench or []))
    if not runs and not table:
        raise ValueError("nothing to report: give lm-eval results or --baselines")
    board = build_leaderboard(runs, table)
    plots = make_plots(board, benches)

    output = Path(output)
    if output.exists() and not overwrite:
        raise ValueError(f"{output} exists")
    if output.exists() and (not output.is_dir() or (any(output.iterdir()) and not (output / "index.html").exists())):
        raise ValueError(f"{output} exists and is not an earlier report folder; not replacing it")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        (tmp / "leaderboard.md").write_text(render_markdown(board, plots))
        (tmp / "index.html").write_text(render_html(board, plots))
        os.chmod(tmp, 0o755)
        if output.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
            os.replace(output, old / "report")
            os.replace(tmp, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return output
