"""Ablation of hybrid designs for SmolLM2-135M at one token budget: which 1:3 hybrid keeps the teacher's quality
and recall for the least decoding cost.

Held fixed: the teacher (smollm2-135m), the training data (the default mix: Austen + Shakespeare training splits),
the recipe's stages and the token budget. Varied: the mixer of the converted layers (GDN; SWA with a 64-, 128- or
512-token window and 4 attention sinks, and 512 without sinks; swa_gdn, SWA plus a gated GDN memory) and where the
full-attention layers sit (evenly interleaved, or recall-aware: the 7 layers whose heads copy most from context,
as `plan --strategy sensitivity --keep-retrieval 7` ranks them for SmolLM2-135M).

Each variant runs plan -> convert -> distill -> eval in OUT/VARIANT with the library's own functions:
  - eval: held-out perplexity on two domains no training data covers (Jargon File, Devil's Dictionary) at 512-,
    2,048- and 8,192-token windows; passkey at 1K and 4K tokens; MQAR with 64 pairs;
  - the distillation's wall-clock seconds.
Then one bench (CPU, fp32, synthetic cache) times the teacher and every variant side by side, so all speed ratios
come from one run: decode tokens/s at 1K (batch 1), 8K (batch 8) and 32K (batch 1), cache bytes at 8K (decoding
speed does not depend on the weights, so the converted checkpoints stand in for the students).
A finished variant has OUT/VARIANT/result.json and is skipped on a re-run; an unfinished one resumes at its first
missing step (distill from its last checkpoint). The teacher's own eval is the `teacher` row. The table marks the
Pareto-optimal variants (perplexity ratio, recall, decode speed) with ★, and the shipped default (the
smollm2-135m-demo recipe's design) with "default". Results: OUT/ablation.json, OUT/ablation.md.

    python scripts/ablate_hybrids.py --out runs/ablation --tokens 32k
    python scripts/ablate_hybrids.py --out runs/ablation --variants gdn,swa128 --tokens 20k --recall-docs 5
    python scripts/ablate_hybrids.py --list
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

TEACHER = "smollm2-135m"
BASE_RECIPE = "smollm2-135m-demo"  # its stages (align, kd) at the ratios the demo uses; rescaled by --tokens
DEFAULT_VARIANT = "swa512-recall"  # the design the smollm2-135m-demo recipe ships
# SmolLM2-135M's layers whose heads copy most from context (retrieval scores of `plan --keep-retrieval`):
# 18, 17, 20, 6, 23, 21, 24, then 19; a 1:3 plan of its 30 layers keeps 7 full.
RECALL_LAYERS = [6, 17, 18, 20, 21, 23, 24]
PPL_DOMAINS = {"jargon": "local_jargon_ppl", "devil": "local_devil_ppl"}
PPL_WINDOWS = (512, 2048, 8192)
RECALL_TASKS = {"passkey_1k": "recall_passkey_1024", "passkey_4k": "recall_passkey_4096", "mqar_64": "recall_mqar_64"}
BENCH_POINTS = {"1k_b1": (1024, 1), "8k_b8": (8192, 8), "32k_b1": (32768, 1)}
RESULT_FILE = "result.json"


@dataclass(frozen=True)
class Variant:
    name: str
    mixer: str  # the mixer of the converted layers (1:3 with full attention)
    window: int | None  # SWA window of swa / swa_gdn
    recall_aware: bool  # full attention on RECALL_LAYERS, instead of evenly interleaved
    sinks: int = 4  # SWA attention sinks

    def recipe(self, stages: list[dict]) -> dict:
        plan: dict = {"mix": {"full_attention": 1, self.mixer: 3}, "placement": "interleave"}
        if self.recall_aware:
            plan.update(placement="explicit", layers=RECALL_LAYERS)
        if self.window is not None:  # swa_gdn reads the swa section for its window
            plan["mixers"] = {"swa": {"window": self.window, "sinks": self.sinks}}
        return {"plan": plan, "stages": stages}


def all_variants() -> dict[str, Variant]:
    designs = [("gdn", "gdn", None, 4)]
    designs += [(f"swa{w}", "swa", w, 4) for w in (64, 128, 512)]
    designs += [("swa512-nosinks", "swa", 512, 0)]
    designs += [(f"swa_gdn{w}", "swa_gdn", w, 4) for w in (128, 512)]
    variants = {}
    for name, mixer, window, sinks in designs:
        variants[name] = Variant(name, mixer, window, recall_aware=False, sinks=sinks)
        variants[f"{name}-recall"] = Variant(f"{name}-recall", mixer, window, recall_aware=True, sinks=sinks)
    return variants


# --------------------------------------------------------------------------------------------------- steps


def atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def base_stages(recipe: str) -> list[dict]:
    from lt2convert.recipes import read_recipe_data

    data, _origin = read_recipe_data(recipe)
    return data["stages"]


def make_plan(variant: Variant, folder: Path, args: argparse.Namespace) -> Path:
    from lt2convert.plan import make_plan

    plan_file = folder / "plan.yaml"
    if plan_file.is_file():
        return plan_file
    recipe_file = folder / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(variant.recipe(base_stages(args.recipe)), sort_keys=False))
    make_plan(args.teacher, recipe=str(recipe_file), output=plan_file)
    return plan_file


def convert_hybrid(plan_file: Path, folder: Path, args: argparse.Namespace) -> Path:
    from lt2convert.convert import convert_model

    hybrid = folder / "hybrid"
    if not hybrid.is_dir():
        convert_model(args.teacher, plan_file, hybrid)
    return hybrid


def distill_student(hybrid: Path, folder: Path, args: argparse.Namespace) -> tuple[Path, float]:
    """The distilled student and the distillation's wall-clock seconds (summed over resumed attempts)."""
    from lt2convert.distill import DistillConfig, distill, load_stages, scale_budgets
    from lt2convert.distill.data import default_training_data

    run, timing = folder / "distill", folder / "distill_seconds.json"
    spent = json.loads(timing.read_text())["seconds"] if timing.is_file() else 0.0
    if (run / "final").is_dir() and timing.is_file() and json.loads(timing.read_text()).get("finished"):
        return run / "final", spent
    stages = scale_budgets(load_stages(str(folder / "recipe.yaml")), args.tokens)
    config = DistillConfig(
        teacher=args.teacher, student=str(hybrid), data=default_training_data(), out=str(run), stages=stages,
        progress=not args.no_progress,
    )
    begun = time.perf_counter()
    try:
        result = distill(config, resume=True)
    finally:
        atomic_json(timing, {"seconds": spent + time.perf_counter() - begun, "finished": False})
    spent += time.perf_counter() - begun
    atomic_json(timing, {"seconds": spent, "finished": True, "tokens": result.tokens})
    return result.final, spent


def eval_tasks() -> list[str]:
    ppl = [f"{task}_{w}" for task in PPL_DOMAINS.values() for w in PPL_WINDOWS]
    return ppl + list(RECALL_TASKS.values())


def evaluate_model(model: str, folder: Path, args: argparse.Namespace) -> dict[str, float]:
    """Primary metric of each task (word perplexity, or recall accuracy), cached in folder/eval.json."""
    from lt2convert.evaluate import evaluate

    cached = folder / "eval.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    scores: dict[str, float] = {}
    ppl = [t for t in eval_tasks() if t.startswith("local_")]
    recall = [t for t in eval_tasks() if t.startswith("recall_")]
    # Batch 1 for perplexity: lm-eval pads a batch to its longest window, and a batch of 8,192-token windows holds
    # batch x 8,192 x 49,152 fp32 logits twice (1.6 GB each per sequence).
    for tasks, limit, batch in ((ppl, args.ppl_docs, 1), (recall, args.recall_docs, args.batch_size)):
        results = evaluate(model, tasks=tasks, limit=limit, batch_size=batch, output=folder / "eval",
                           device="cpu", dtype="fp32")
        for task in tasks:
            metric = "word_perplexity" if task.startswith("local_") else "acc"
            scores[task] = results["results"][task][f"{metric},none"]
    atomic_json(cached, scores)
    return scores


def bench_all(rows: list[dict], out: Path, args: argparse.Namespace) -> dict:
    """{variant: bench figures} with the teacher and every variant timed in one run per bench point: decode
    tokens/s and its ratio to the teacher's; cache at 8K. Cached in OUT/bench.json for the same variants."""
    from lt2convert.bench import bench

    cached = out / "bench.json"
    names = [row["variant"] for row in rows]
    if cached.is_file() and sorted(json.loads(cached.read_text())) == sorted(names):
        return json.loads(cached.read_text())
    models = [args.teacher, *(str(out / name / "hybrid") for name in names)]
    figures: dict = {name: {} for name in names}
    for key, (context, batch) in BENCH_POINTS.items():
        # Prefill is timed once on a short prompt: only decoding is compared here (a 32K prefill of 8 models would
        # take longer than the rest of the ablation).
        measured = bench(models, [context], batch, names=["teacher", *names], device="cpu", dtype="fp32",
                         decode_tokens=args.decode_tokens, prefill=256, repeats=1)
        teacher = measured["models"][0]["decode"][str(context)]
        for name, row in zip(names, measured["models"][1:], strict=True):
            mine = row["decode"][str(context)]
            figures[name][key] = {"teacher_tokens_per_s": teacher["tokens_per_s"],
                                  "tokens_per_s": mine["tokens_per_s"], "ratio": mine["ratio"]}
            if context == 8192:
                figures[name]["cache_8k"] = {"bytes_per_sequence": mine["cache_bytes"] // batch,
                                             "teacher_bytes_per_sequence": teacher["cache_bytes"] // batch,
                                             "ratio": mine["cache_bytes_ratio"]}
    atomic_json(cached, figures)
    return figures


def plan_summary(plan_file: Path) -> dict:
    from lt2convert.plan import read_plan

    layers = read_plan(plan_file).layer_types
    return {"full_layers": [i for i, t in enumerate(layers) if t == "full_attention"], "layer_types": layers}


def run_variant(variant: Variant, out: Path, args: argparse.Namespace, log: Callable[[str], None]) -> dict:
    folder = out / variant.name
    folder.mkdir(parents=True, exist_ok=True)
    steps: dict[str, float] = {}

    def timed(name: str, action: Callable):
        begun = time.perf_counter()
        log(f"  {variant.name}: {name}")
        value = action()
        steps[name] = round(time.perf_counter() - begun, 1)
        return value

    plan_file = timed("plan", lambda: make_plan(variant, folder, args))
    hybrid = timed("convert", lambda: convert_hybrid(plan_file, folder, args))
    student, distill_seconds = timed("distill", lambda: distill_student(hybrid, folder, args))
    scores = timed("eval", lambda: evaluate_model(str(student), folder, args))
    return {
        "variant": variant.name, "mixer": variant.mixer, "window": variant.window,
        "plan": "recall-aware" if variant.recall_aware else "interleaved", **plan_summary(plan_file),
        "tokens": args.tokens, "distill_seconds": round(distill_seconds, 1), "eval": scores,
        "step_seconds": steps,
    }


def run_teacher(out: Path, args: argparse.Namespace) -> dict:
    folder = out / "teacher"
    folder.mkdir(parents=True, exist_ok=True)
    return {"variant": "teacher", "eval": evaluate_model(args.teacher, folder, args)}


# --------------------------------------------------------------------------------------------------- table


def ppl_ratio(row: dict, teacher: dict, task: str) -> float | None:
    mine, base = row["eval"].get(task), teacher["eval"].get(task)
    return mine / base if mine and base else None


def scores(row: dict, teacher: dict) -> tuple[float, float, float]:
    """(geometric-mean perplexity ratio to the teacher, mean recall accuracy, geometric-mean decode ratio)."""
    ratios = [ppl_ratio(row, teacher, f"{t}_{w}") for t in PPL_DOMAINS.values() for w in PPL_WINDOWS]
    ppl = math.exp(sum(math.log(r) for r in ratios if r) / max(1, sum(1 for r in ratios if r)))
    recall = sum(row["eval"].get(t, 0.0) for t in RECALL_TASKS.values()) / len(RECALL_TASKS)
    speeds = [row["bench"][k]["ratio"] for k in BENCH_POINTS if row["bench"][k]["ratio"]]
    speed = math.exp(sum(math.log(s) for s in speeds) / max(1, len(speeds)))
    return ppl, recall, speed


def pareto(rows: list[dict], teacher: dict) -> set[str]:
    """Variants no other variant beats on all of (lower perplexity ratio, higher recall, higher speed)."""
    points = {row["variant"]: scores(row, teacher) for row in rows}

    def dominated(a, b) -> bool:  # b dominates a
        return b[0] <= a[0] and b[1] >= a[1] and b[2] >= a[2] and b != a

    return {name for name, p in points.items() if not any(dominated(p, q) for q in points.values())}


def fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}g}"


def markdown(rows: list[dict], teacher: dict, args: argparse.Namespace) -> str:
    best = pareto(rows, teacher)
    ppl_heads = [f"{d} ppl {w // 1024 or w}{'K' if w >= 1024 else ''}" for d in PPL_DOMAINS for w in PPL_WINDOWS]
    heads = ["variant", "plan (full layers)", *ppl_heads, "passkey 1K", "passkey 4K", "MQAR-64",
             "decode 1K b1", "decode 8K b8", "decode 32K b1", "cache 8K", "distill s"]
    lines = [
        f"Teacher {args.teacher}; {args.tokens:,} distillation tokens per variant ({args.recipe} stages); word "
        "perplexity with the ratio to the teacher's; recall accuracy "
        f"({args.recall_docs or 'all'} documents per task); decode tokens/s ratio to the teacher's (same run; CPU, "
        "fp32, synthetic cache); cache bytes ratio at 8K. ★ = Pareto-optimal on (perplexity ratio, recall, speed).",
        "",
        "| " + " | ".join(heads) + " |",
        "|" + "---|" * len(heads),
    ]
    teacher_cells = [fmt(teacher["eval"].get(f"{t}_{w}")) for t in PPL_DOMAINS.values() for w in PPL_WINDOWS]
    lines.append("| teacher | all full | " + " | ".join(teacher_cells) + " | "
                 + " | ".join(fmt(teacher["eval"].get(t), 2) for t in RECALL_TASKS.values())
                 + " | 1 | 1 | 1 | 1 | – |")
    for row in rows:
        ppl = []
        for task in PPL_DOMAINS.values():
            for w in PPL_WINDOWS:
                value, r = row["eval"].get(f"{task}_{w}"), ppl_ratio(row, teacher, f"{task}_{w}")
                ppl.append(f"{fmt(value)} ({fmt(r)}×)")
        recall = [fmt(row["eval"].get(t), 2) for t in RECALL_TASKS.values()]
        speed = [f"{fmt(row['bench'][k]['ratio'])}×" for k in BENCH_POINTS]
        mark = (" ★" if row["variant"] in best else "") + (" (default)" if row["variant"] == DEFAULT_VARIANT else "")
        cells = [f"{row['variant']}{mark}", f"{row['plan']} {row['full_layers']}", *ppl, *recall, *speed,
                 f"{fmt(row['bench']['cache_8k']['ratio'])}×", f"{row['distill_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from lt2convert.distill.recipe import parse_tokens

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/ablation", help="Output folder (one subfolder per variant).")
    parser.add_argument("--variants", help="Comma-separated variant names (default: all; see --list).")
    parser.add_argument("--list", action="store_true", help="List the variants and exit.")
    parser.add_argument("--teacher", default=TEACHER, help="The source model (another only for smoke runs).")
    parser.add_argument("--tokens", default="32k", help="Distillation tokens per variant, e.g. 300k.")
    parser.add_argument("--recipe", default=BASE_RECIPE, help="Recipe whose stages every variant distills with.")
    parser.add_argument("--recall-docs", type=int, default=20, help="Documents per recall task (0: all 50).")
    parser.add_argument("--ppl-docs", type=int, default=0,
                        help="Documents per perplexity task (0: all, the same 8,192 tokens at every window; "
                        "N cuts each window's task to its first N pieces, for quick runs).")
    parser.add_argument("--decode-tokens", type=int, default=8, help="Timed decoding steps per bench point.")
    parser.add_argument("--batch-size", type=int, default=4, help="lm-eval batch size of the recall tasks.")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    args.tokens = parse_tokens(args.tokens, "--tokens")
    args.recall_docs = args.recall_docs or None
    args.ppl_docs = args.ppl_docs or None
    known = all_variants()
    args.selected = list(known) if not args.variants else [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.selected if v not in known]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; known: {', '.join(known)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    known = all_variants()
    if args.list:
        for v in known.values():
            print(f"{v.name}: full_attention:1,{v.mixer}:3"
                  + (f", window {v.window}, {v.sinks} sinks" if v.window else "")
                  + (f", recall-aware (full: {RECALL_LAYERS})" if v.recall_aware else ", interleaved"))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        print(line, flush=True)

    teacher_file = out / "teacher" / RESULT_FILE
    if not teacher_file.is_file():
        log("teacher: eval")
        atomic_json(teacher_file, run_teacher(out, args))
    teacher = json.loads(teacher_file.read_text())
    failures = []
    for name in args.selected:
        done = out / name / RESULT_FILE
        if done.is_file():
            log(f"{name}: finished earlier, skipped")
            continue
        log(f"{name}:")
        try:
            atomic_json(done, run_variant(known[name], out, args, log))
        except Exception as err:  # one variant's failure (e.g. a mixer this build lacks) must not stop the others
            message = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
            log(f"{name}: FAILED: {message}")
            (out / name / "error.txt").write_text(traceback.format_exc())
            failures.append((name, message))

    rows = [json.loads((out / n / RESULT_FILE).read_text()) for n in known if (out / n / RESULT_FILE).is_file()]
    if rows:
        log("bench: the teacher and every variant, side by side")
        speeds = bench_all(rows, out, args)
        rows = [{**row, "bench": speeds[row["variant"]]} for row in rows]
    table = markdown(rows, teacher, args) if rows else "no finished variant yet\n"
    atomic_json(out / "ablation.json", {"teacher": teacher, "variants": rows, "tokens": args.tokens,
                                         "recipe": args.recipe, "failed": dict(failures)})
    (out / "ablation.md").write_text(table)
    print()
    print(table)
    for name, message in failures:
        print(f"failed: {name}: {message} (details: {out / name / 'error.txt'})", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
