"""Overhead of the distillation loop: seconds per step of `distill` vs a bare loop doing the same work.

The bare loop runs the same models on the same batches with nothing else: teacher forward; for align, every
converted mixer's forward/backward on the teacher's inputs; for kd, student forward/backward on the KL; then an
AdamW step. The trainer adds data packing, gradient clipping, metrics, progress and checkpoints. Both are timed
in one run, side by side:

    .venv/bin/python scripts/bench_distill.py                # tiny model and SmolLM2-135M
    .venv/bin/python scripts/bench_distill.py --models tiny
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lt2convert import load_model
from lt2convert.calibrate import capture_mixer_calls
from lt2convert.convert import convert_checkpoint
from lt2convert.distill import DistillConfig, Stage, run_distillation
from lt2convert.distill.losses import align_loss, kd_loss
from lt2convert.io.assets import fetch_asset
from lt2convert.loading import derive_config, load_config
from lt2convert.testing import ouro_config, write_checkpoint


def bare_align(teacher, student, converted: list[int], ids: torch.Tensor, optimizer) -> None:
    def on_call(index, step, module, x, ctx, output):
        if index in converted:
            with torch.enable_grad():
                align_loss(student.model.layers[index].self_attn(x, ctx, None), output, True).backward()

    capture_mixer_calls(teacher, ids, on_call)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def bare_kd(teacher, student, converted: list[int], ids: torch.Tensor, optimizer) -> None:
    with torch.no_grad():
        target = teacher(ids, use_cache=False).logits
    kd_loss(student(input_ids=ids, use_cache=False).logits, target).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


BARE = {"align": bare_align, "kd": bare_kd}


def bare_seconds_per_step(teacher_path, student_path, stage: Stage, steps: int) -> float:
    teacher = load_model(teacher_path, dtype="float32")
    teacher.requires_grad_(False)
    student = load_model(student_path, dtype="float32")
    student.requires_grad_(False)
    converted = [i for i, (a, b) in enumerate(zip(teacher.config.layer_types, student.config.layer_types,
                                                  strict=True)) if a != b]
    for i in converted:
        student.model.layers[i].self_attn.requires_grad_(True)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=stage.lr)
    generator = torch.Generator().manual_seed(0)
    vocab = teacher.config.vocab_size
    times = []
    for _ in range(steps):
        ids = torch.randint(0, vocab, (stage.batch_size, stage.seq_len), generator=generator)
        started = time.perf_counter()
        BARE[stage.kind](teacher, student, converted, ids, optimizer)
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def trainer_seconds_per_step(run: Path, stage_name: str) -> float:
    """Wall time per step inside the stage loop (first step excluded: it warms up)."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    elapsed = [line["elapsed"] for line in lines if line["stage"] == stage_name]
    return (elapsed[-1] - elapsed[0]) / (len(elapsed) - 1)


def tiny_pair(folder: Path) -> tuple[Path, Path, str]:
    config = ouro_config(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, head_dim=64, total_ut_steps=4)
    teacher = write_checkpoint(folder / "teacher", config, seed=0)
    source, _ = load_config(teacher)
    target = derive_config(source, {"layer_types": ["gdn", "gdn", "gdn", "full_attention"]})
    student = convert_checkpoint(teacher, target, folder / "student")
    return teacher, student, "bytes"


def smollm2_pair(folder: Path) -> tuple[Path, Path, str]:
    from lt2convert.convert import convert_model
    from lt2convert.plan import make_plan

    teacher = fetch_asset("smollm2-135m")
    make_plan(str(teacher), recipe="smollm2-135m-full-gdn", output=folder / "plan.yaml")
    return teacher, convert_model(teacher, folder / "plan.yaml", folder / "student"), "student"


def bench_model(name: str, pair, seq_len: int, batch: int, steps: int, data: Path) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        teacher, student, tokenizer = pair(work)
        stages = [
            Stage(name="align", kind="align", tokens=steps * seq_len * batch, seq_len=seq_len, batch_size=batch),
            Stage(name="kd", kind="kd", tokens=steps * seq_len * batch, seq_len=seq_len, batch_size=batch, lr=1e-4),
        ]
        run_distillation(DistillConfig(
            teacher=str(teacher), student=str(student), data=[str(data)], out=str(work / "run"),
            stages=stages, tokenizer=tokenizer, progress=False,
        ))
        for stage in stages:
            trainer = trainer_seconds_per_step(work / "run", stage.name)
            bare = bare_seconds_per_step(teacher, student, dataclasses.replace(stage), steps)
            rows.append({"model": name, "stage": stage.name, "tokens_per_step": stage.tokens_per_step,
                         "trainer_s": trainer, "bare_s": bare, "trainer_tokens_per_s": stage.tokens_per_step / trainer,
                         "overhead": trainer / bare})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,smollm2", help="comma-separated: tiny, smollm2")
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    data = fetch_asset("shakespeare") / "train.txt"
    setups = {"tiny": (tiny_pair, 256, 4), "smollm2": (smollm2_pair, 256, 4)}
    rows = []
    for name in args.models.split(","):
        pair, seq_len, batch = setups[name]
        rows += bench_model(name, pair, seq_len, batch, args.steps, data)
    print("| model | stage | tokens/step | trainer s/step | bare s/step | trainer tokens/s | overhead |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['stage']} | {r['tokens_per_step']} | {r['trainer_s']:.3f} | {r['bare_s']:.3f} | "
              f"{r['trainer_tokens_per_s']:.0f} | {r['overhead']:.2f}× |")


if __name__ == "__main__":
    main()
