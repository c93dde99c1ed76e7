"""The leaderboard (one column per comparable task, shots, metric and filter) and the story told above it:
one primary number per task, each student against the teacher, and the speed it buys."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from lt2convert.errors import ConfigError
from lt2convert.report.inputs import Cell, Key, Model

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


def normalise(name: str) -> str:
    name = name.replace(" (random init)", "").rstrip("/")
    return Path(name).name.lower()


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
            raise ConfigError(f"--teacher {teacher!r}: no results for that model (models: {', '.join(names)})")
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
