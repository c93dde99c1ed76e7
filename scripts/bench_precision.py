"""Distillation speed and losses in fp32 and under bf16 autocast, side by side in one run.

SmolLM2-135M converted by the smollm2-135m-full-gdn recipe; each round runs a short align + kd distillation in
fp32 and in bf16 (the order alternates between rounds, so a busy machine penalises both alike). Same data, same
seed, so the two runs see the same windows and their per-step losses can be compared directly:

    .venv/bin/python scripts/bench_precision.py                  # 2 rounds of 6 steps per stage
    .venv/bin/python scripts/bench_precision.py --rounds 1 --steps 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from lt2convert.distill import DistillConfig, Stage, distill
from lt2convert.io.assets import fetch_asset

sys.path.insert(0, str(Path(__file__).parent))
from bench_distill import smollm2_pair  # noqa: E402

PRECISIONS = ("fp32", "bf16")


def stage_lines(run: Path) -> dict[str, list[dict]]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {stage: [m for m in lines if m["stage"] == stage] for stage in ("align", "kd")}


def run_once(teacher: Path, student: Path, data: Path, out: Path, precision: str, seq_len: int, batch: int,
             steps: int) -> dict[str, list[dict]]:
    stages = [
        Stage(name="align", kind="align", tokens=steps * seq_len * batch, seq_len=seq_len, batch_size=batch),
        Stage(name="kd", kind="kd", tokens=steps * seq_len * batch, seq_len=seq_len, batch_size=batch, lr=1e-4),
    ]
    distill(DistillConfig(teacher=str(teacher), student=str(student), data=[str(data)], out=str(out), stages=stages,
                          precision=precision, progress=False))
    return stage_lines(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    data = fetch_asset("shakespeare") / "train.txt"
    speeds: dict[tuple[str, str], list[float]] = {}
    losses: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        teacher, student, _ = smollm2_pair(work)
        for round_index in range(args.rounds):
            order = PRECISIONS if round_index % 2 == 0 else PRECISIONS[::-1]
            for precision in order:
                out = work / f"run-{round_index}-{precision}"
                lines = run_once(teacher, student, data, out, precision, args.seq_len, args.batch, args.steps)
                for stage, stage_metrics in lines.items():
                    # Step 1 warms up (allocations, thread pools); the rest is the steady state.
                    speeds.setdefault((stage, precision), []).extend(m["tokens_per_s"] for m in stage_metrics[1:])
                    losses[(stage, precision)] = [m["loss"] for m in stage_metrics]
    print("| stage | fp32 tokens/s | bf16 tokens/s | bf16 speed-up | max per-step loss difference (relative) |")
    print("|---|---|---|---|---|")
    for stage in ("align", "kd"):
        fp32, bf16 = (statistics.median(speeds[(stage, p)]) for p in PRECISIONS)
        a, b = losses[(stage, "fp32")], losses[(stage, "bf16")]
        worst = max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True))
        print(f"| {stage} | {fp32:.0f} | {bf16:.0f} | {bf16 / fp32:.2f}× | {worst:.2%} |")
    for stage in ("align", "kd"):
        print(f"{stage} losses fp32: {[round(x, 4) for x in losses[(stage, 'fp32')]]}")
        print(f"{stage} losses bf16: {[round(x, 4) for x in losses[(stage, 'bf16')]]}")


if __name__ == "__main__":
    main()
