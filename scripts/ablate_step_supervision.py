"""Per-step supervision against last-step-only, at the same budget, on a looped teacher.

One conversion (the recipe's plan), then two distill runs from that same converted student with identical stages
except kd's `every_step`: True supervises every loop step's logits, False only the last step's. Each student is
then measured next to the teacher and the untrained conversion:

- held-out perplexity at each exit step (`exit_at_step = 0 … T−1`, teacher-forced, token level) on two domains
  the training text does not contain (the Jargon File, the Devil's Dictionary);
- recall: the recall suite's tasks (exact greedy continuation), at the default exit.

    python scripts/ablate_step_supervision.py [--teacher DIR] [--recipe smollm2-looped-demo] [--work DIR]

Defaults: the `smollm2-looped` asset and its demo recipe. Prints a table and writes `ablation.json` in --work.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from lt2convert.convert import convert_model
from lt2convert.distill import DistillConfig, load_stages, run_distillation, scale_budgets
from lt2convert.distill.data import default_training_data
from lt2convert.evaluate import evaluate
from lt2convert.exit_sweep import held_out_ids
from lt2convert.io.assets import fetch_asset
from lt2convert.loading import load_model
from lt2convert.looped_asset import step_logits, token_losses
from lt2convert.plan import make_plan

HELD_OUT = ("jargon", "devils-dictionary")
RECALL_TASKS = "recall_passkey_256,recall_passkey_1024,recall_mqar_16"


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", help="looped checkpoint folder (default: the smollm2-looped asset)")
    parser.add_argument("--recipe", default="smollm2-looped-demo")
    parser.add_argument("--work", type=Path, default=Path("ablate-step-supervision"))
    parser.add_argument("--tokens", type=int, help="total distill tokens (default: the recipe's)")
    parser.add_argument("--windows", type=int, default=8, help="perplexity windows per held-out text")
    parser.add_argument("--window-tokens", type=int, default=1024, help="past the SWA window")
    parser.add_argument("--recall-tasks", default=RECALL_TASKS)
    parser.add_argument("--recall-limit", type=int, default=20, help="examples per recall task")
    return parser.parse_args()


@torch.no_grad()
def perplexity_per_exit_step(folder: str, windows: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Teacher-forced perplexity of every exit step, per held-out text."""
    model = load_model(folder, dtype="float32").eval()
    result = {}
    for name, ids in windows.items():
        # One forward gives every step's hidden state: [windows, steps] mean token losses.
        losses = [[token_losses(logits, w).mean().item() for logits in step_logits(model, w)[0]] for w in ids.split(1)]
        result[name] = [round(math.exp(statistics.fmean(step)), 3) for step in zip(*losses, strict=True)]
    return result


def recall(folder: str, tasks: str, limit: int, out: Path) -> dict[str, float]:
    results = evaluate(folder, tasks=tasks, limit=limit, batch_size=4, output=out, device="cpu", dtype="fp32")
    return {row["task"]: row["value"] for row in results["lt2convert"]["rows"] if row["primary"]}


def distilled(teacher: str, student: Path, stages: list, out: Path) -> str:
    config = DistillConfig(teacher=teacher, student=str(student), data=default_training_data(), out=str(out),
                           stages=stages, progress=False)
    return str(run_distillation(config, resume=True).final)


def claim_work_folder(work: Path, settings: dict) -> None:
    """Resume only our own run with the same settings: never reuse (or write into) a folder something else made."""
    marker = work / "step-supervision.json"
    if marker.is_file():
        if json.loads(marker.read_text(encoding="utf-8")) != settings:
            sys.exit(f"{work}: an ablation with other settings; choose another --work")
        return
    if work.exists() and any(work.iterdir()):
        sys.exit(f"{work}: exists and is not this script's work folder; choose another --work")
    work.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(settings) + "\n", encoding="utf-8")


def main() -> None:
    args = arguments()
    teacher = args.teacher or str(fetch_asset("smollm2-looped"))
    work = args.work
    claim_work_folder(work, {"teacher": teacher, "recipe": args.recipe, "tokens": args.tokens})
    started = time.monotonic()
    plan_file = work / "plan.yaml"
    if not plan_file.is_file():
        make_plan(teacher, recipe=args.recipe, output=plan_file)
    hybrid = work / "hybrid"
    if not hybrid.is_dir():
        convert_model(teacher, plan_file, hybrid)
    stages = load_stages(args.recipe)
    if args.tokens:
        stages = scale_budgets(stages, args.tokens)
    if not any(stage.kind == "kd" for stage in stages):
        sys.exit(f"recipe {args.recipe}: no kd stage, nothing to ablate")
    variants = {
        name: [dataclasses.replace(s, every_step=every) if s.kind == "kd" else s for s in stages]
        for name, every in (("every step", True), ("last step only", False))
    }
    models = {"teacher": teacher, "converted (untrained)": str(hybrid)}
    seconds = {}
    for name, variant in variants.items():
        begun = time.monotonic()
        models[name] = distilled(teacher, hybrid, variant, work / name.replace(" ", "-"))
        seconds[name] = round(time.monotonic() - begun, 1)
    windows = {text: held_out_ids(Path(teacher), (text,), args.window_tokens, args.windows) for text in HELD_OUT}
    rows = {}
    for name, folder in models.items():
        rows[name] = {
            "perplexity_per_exit_step": perplexity_per_exit_step(folder, windows),
            "recall": recall(folder, args.recall_tasks, args.recall_limit, work / "eval" / name.replace(" ", "-")),
        }
        print(f"{name}: {json.dumps(rows[name])}", file=sys.stderr, flush=True)
    record = {
        "teacher": teacher, "recipe": args.recipe, "stages": [dataclasses.asdict(s) for s in stages],
        "held_out": {"texts": HELD_OUT, "windows": args.windows, "window_tokens": args.window_tokens},
        "recall": {"tasks": args.recall_tasks, "limit": args.recall_limit},
        "distill_seconds": seconds, "total_seconds": round(time.monotonic() - started, 1), "rows": rows,
    }
    (work / "ablation.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    for line in table(rows):
        print(line)


def table(rows: dict) -> list[str]:
    """Markdown: a column per (held-out text, exit step), then one per recall task."""
    first = next(iter(rows.values()))
    texts = list(first["perplexity_per_exit_step"])
    steps = len(first["perplexity_per_exit_step"][texts[0]])
    tasks = list(first["recall"])
    header = ["model", *(f"{t} ppl @ step {k + 1}" for t in texts for k in range(steps)), *tasks]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in rows.items():
        cells = [f"{v:,.1f}" for t in texts for v in row["perplexity_per_exit_step"][t]]
        cells += [f"{row['recall'].get(task, float('nan')):.2f}" for task in tasks]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return lines


if __name__ == "__main__":
    main()
