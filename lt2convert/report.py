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
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from lt2convert.io.outputs import REPORT_MARKER, atomic_directory

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
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start}); expected lm-eval results JSON") from err
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
    """One Model per model name, in the order the inputs first name them; a later results file (by name:
    results_[<suite>_]<ISO date>.json) replaces an earlier one's number for the same task, shots, metric and
    filter."""
    models: dict[str, Model] = {}
    first_input: dict[str, int] = {}
    files = [(i, path) for i, item in enumerate(inputs) for path in find_result_files([item])]
    for index, path in sorted(files, key=lambda f: (f[1].name, str(f[1]))):
        name, cells = read_lm_eval(path)
        first_input[name] = min(first_input.get(name, index), index)
        model = models.setdefault(name, Model(name, "run", str(path)))
        if model.source != str(path) and str(path) not in model.source:
            model.source += f", {path}"
        for cell in cells:
            if cell.key in model.cells:
                model.notes.append(f"{cell.key.describe()}: {path.name} replaces an earlier result")
            model.cells[cell.key] = cell
    return sorted(models.values(), key=lambda m: first_input[m.name])


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
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:  # ValueError: not JSON, or not UTF-8
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
# The story: task groups, one primary number per task, teacher vs students, speed


def suite_tasks() -> tuple[dict[str, str], dict[str, str]]:
    """task -> the first suite (evals/suites.yaml) that holds it, and task -> the metric that suite shows first."""
    from lt2convert.evaluate import load_suites

    groups: dict[str, str] = {}
    primary: dict[str, str] = {}
    for suite, entry in load_suites().items():
        for task in entry["tasks"]:
            groups.setdefault(task["task"], suite)
            if task.get("metric"):
                primary.setdefault(task["task"], task["metric"])
    return groups, primary


def column_group(column: Column, groups: dict[str, str], baselines: dict | None) -> str:
    if column.baseline:
        return f"{baselines['name']} benchmarks" if baselines else "paper benchmarks"
    task = column.key.task if column.key else ""
    return groups.get(task, "other tasks")


def grouped_columns(board: dict) -> list[tuple[str, list[Column]]]:
    """The leaderboard's columns by task group: the paper's benchmarks, then the suites in suites.yaml's order."""
    groups, _ = suite_tasks()
    order = {name: i for i, name in enumerate(dict.fromkeys(groups.values()))}
    by_group: dict[str, list[Column]] = {}
    for column in board["columns"]:
        by_group.setdefault(column_group(column, groups, board["baselines"]), []).append(column)
    return sorted(by_group.items(), key=lambda kv: (not kv[1][0].baseline, order.get(kv[0], len(order)), kv[0]))


def primary_columns(board: dict) -> list[Column]:
    """One column per task that an evaluated model has a number in: the suite's chosen metric (or the task's
    first) at the paper's setting where a baseline column holds it, else the first setting found."""
    _, primary = suite_tasks()
    runs = {m.name for m in board["models"] if m.kind == "run"}
    chosen: dict[str, Column] = {}
    for column in board["columns"]:
        if column.key is None or not runs & set(column.values):
            continue
        task = column.key.task
        wanted = primary.get(task)
        if wanted is not None:
            metric, _, filt = wanted.partition(",")
            if column.key.metric != metric or (filt and column.key.filter != filt):
                continue
        if task not in chosen or (column.baseline and not chosen[task].baseline):
            chosen[task] = column
    return list(chosen.values())


@dataclass
class MetricKept:
    """One metric of a student against the teacher."""

    column: Column
    teacher: float
    student: float

    @property
    def difference(self) -> float:
        return self.student - self.teacher

    @property
    def kept(self) -> float | None:
        """Percent of the teacher's quality: student/teacher, or teacher/student where lower is better. A student
        at 0 where the teacher scores keeps 0% (higher is better); only a teacher at 0 gives no ratio."""
        if self.column.higher_is_better:
            return 100 * self.student / self.teacher if self.teacher > 0 and self.student >= 0 else None
        return 100 * self.teacher / self.student if self.teacher > 0 and self.student > 0 else None


QUALITY_CAP = 200.0
QUALITY_DEFINITION = (
    "Quality score: for each task, the model's primary metric as a percentage of the teacher's (teacher ÷ model "
    "for lower-is-better metrics such as perplexity), capped at 200; the score is the mean over the tasks both "
    "models were scored on, so the teacher scores 100. A student at 0 where the teacher scores counts as 0; tasks "
    "where the teacher scores 0 are left out."
)


def quality_score(items: list[MetricKept]) -> tuple[float | None, int]:
    kept = [min(QUALITY_CAP, item.kept) for item in items if item.kept is not None]
    return (sum(kept) / len(kept) if kept else None), len(kept)


def crossover(points: list[tuple[int, float]]) -> tuple[float | None, str]:
    """points: (context, student ÷ teacher decode speed), by context. The context where the ratio reaches 1,
    interpolated on log-log axes between the two benched contexts around it, and a sentence saying so."""
    if not points:
        return None, "not benched"
    if points[0][1] >= 1:
        return float(points[0][0]), f"faster at every benched context (from {points[0][0]:,} tokens)"
    for (c0, r0), (c1, r1) in zip(points, points[1:], strict=False):
        if r1 >= 1:
            share = -math.log(r0) / (math.log(r1) - math.log(r0)) if r1 != r0 else 1.0
            at = math.exp(math.log(c0) + share * (math.log(c1) - math.log(c0)))
            return at, f"faster from ≈{at:,.0f} tokens (between {c0:,} and {c1:,})"
    last = points[-1]
    return None, f"not faster up to {last[0]:,} tokens ({last[1]:.2f}× the teacher's speed there)"


@dataclass
class SpeedStory:
    bench: dict
    context: int  # the longest context both were benched at
    speedup: float  # student ÷ teacher decode tokens/s there
    cache_ratio: float  # teacher ÷ student cache bytes there
    crossover_at: float | None
    crossover_text: str


@dataclass
class Headline:
    student: str
    teacher: str
    metrics: list[MetricKept]
    quality: float | None
    tasks: int
    speed: SpeedStory | None


def bench_row(bench: dict, name: str) -> dict | None:
    return next((row for row in bench["models"] if normalise(row["name"]) == normalise(name)), None)


def speed_story(benches: list[dict], teacher: str, student: str) -> SpeedStory | None:
    for bench in benches:
        t, s = bench_row(bench, teacher), bench_row(bench, student)
        if t is None or s is None:
            continue
        contexts = sorted(set(map(int, t.get("decode", {}))) & set(map(int, s.get("decode", {}))))
        if not contexts:
            continue
        ratios = [(c, s["decode"][str(c)]["tokens_per_s"] / t["decode"][str(c)]["tokens_per_s"]) for c in contexts]
        at, text = crossover(ratios)
        longest = str(contexts[-1])
        cache_s = s["decode"][longest]["cache_bytes"]
        return SpeedStory(bench, contexts[-1], ratios[-1][1],
                          t["decode"][longest]["cache_bytes"] / cache_s if cache_s else math.inf, at, text)
    return None


def pick_teacher(runs: list[Model], teacher: str | None) -> str | None:
    """The named run; else a run called 'teacher'; else the first input's model (when there are two or more)."""
    names = [m.name for m in runs]
    if teacher is not None:
        if teacher not in names:
            raise ValueError(f"--teacher {teacher!r}: no results for that model (models: {', '.join(names)})")
        return teacher
    if "teacher" in names:
        return "teacher"
    return names[0] if len(names) > 1 else None


def headlines(board: dict, runs: list[Model], teacher: str | None, benches: list[dict]) -> list[Headline]:
    if teacher is None:
        return []
    columns = primary_columns(board)
    out = []
    for model in runs:
        if model.name == teacher:
            continue
        items = [MetricKept(c, c.values[teacher].value, c.values[model.name].value)
                 for c in columns if teacher in c.values and model.name in c.values]
        quality, tasks = quality_score(items)
        out.append(Headline(model.name, teacher, items, quality, tasks, speed_story(benches, teacher, model.name)))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Training curves (distill run folders)


def load_training(paths: list) -> dict[str, list[dict]]:
    """Stage kind -> one series per (run, stage) from each run folder's metrics.jsonl (a folder, or the file);
    the kinds come from the folder's run.json (a stage without one is its own kind)."""
    series: dict[str, list[dict]] = {}
    many = len(paths or []) > 1
    for item in paths or []:
        path = Path(item)
        metrics = path / "metrics.jsonl" if path.is_dir() else path
        if not metrics.is_file():
            raise ValueError(f"{path}: no metrics.jsonl (not a distill run folder)")
        kinds = {}
        settings = metrics.parent / "run.json"
        if settings.is_file():
            try:
                kinds = {s["name"]: s["kind"] for s in json.loads(settings.read_text()).get("stages", [])}
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{settings}: cannot read the stages ({err})") from err
        by_stage: dict[str, dict] = {}
        for number, line in enumerate(metrics.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                stage, tokens, loss = record["stage"], float(record["tokens"]), float(record["loss"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{metrics}:{number}: not a distill metrics record ({err})") from err
            label = f"{metrics.parent.name}: {stage}" if many else stage
            entry = by_stage.setdefault(stage, {"label": label, "tokens": [], "loss": []})
            entry["tokens"].append(tokens)
            entry["loss"].append(loss)
        for stage, entry in by_stage.items():
            series.setdefault(kinds.get(stage, stage), []).append(entry)
    return series


# ---------------------------------------------------------------------------------------------------------------
# Plots


def normalise(name: str) -> str:
    name = name.replace(" (random init)", "").rstrip("/")
    return Path(name).name.lower()


def bench_label(row: dict, bench: dict, many: bool) -> str:
    label = row["name"]
    if many:
        where = bench.get("device_name", bench.get("device", "?"))
        label += f" [{where}, {bench.get('dtype', '?')}, batch {bench.get('batch', '?')}]"
    return label


def make_plots(board: dict, benches: list[dict], story: list[Headline], teacher: str | None,
               training: dict[str, list[dict]]) -> dict[str, bytes]:
    from lt2convert import report_plots as draw

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
    from lt2convert.render import human_bytes

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
                    qualities: dict[str, float | None]) -> str:
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
                qualities: dict[str, float | None], colors: dict[str, str]) -> str:
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


# ---------------------------------------------------------------------------------------------------------------
# The command


def report(
    inputs: list,
    baselines: str | Path | None = "ouro-paper",
    bench: list | None = None,
    output: str | Path = "report",
    overwrite: bool = True,
    *,
    runs: list | None = None,
    teacher: str | None = None,
) -> Path:
    """Write OUTPUT/leaderboard.md and a self-contained OUTPUT/index.html (inline CSS, PNG plots as data URIs)
    from lm-eval results (files or folders), published baselines, `bench --json` files and distill run folders
    (`runs`, for the training curves). Each other run is compared with `teacher` (default: a run named
    'teacher', else the first input's model). The folder is built in a temporary sibling and renamed into place,
    so a failed run leaves no half-written report."""
    models = load_runs(list(inputs)) if inputs else []
    table = load_baselines(baselines)
    benches = load_bench(list(bench or []))
    training = load_training(list(runs or []))
    if not models and not table:
        raise ValueError("nothing to report: give lm-eval results or --baselines")
    board = build_leaderboard(models, table)
    chosen = pick_teacher(models, teacher)
    story = headlines(board, models, chosen, benches)
    qualities = {chosen: 100.0, **{h.student: h.quality for h in story}} if story else {}
    plots = make_plots(board, benches, story, chosen, training)
    from lt2convert.report_plots import model_colors

    colors = model_colors(chosen, [m.name for m in models])

    output = Path(output)
    with atomic_directory(output, overwrite=overwrite, kind="report") as staging:
        (staging / "leaderboard.md").write_text(render_markdown(board, plots, story, benches, qualities),
                                                encoding="utf-8")
        (staging / "index.html").write_text(render_html(board, plots, story, benches, qualities, colors),
                                            encoding="utf-8")
        (staging / REPORT_MARKER).write_text("written by lt2convert report\n", encoding="utf-8")
    return output
