"""Recall of a real teacher and its linear-time conversions: SmolLM2-135M vs all-GDN vs Full+GDN 1:3.

Converts the `smollm2-135m` asset twice with the CLI (plan + convert, no distillation) and runs the `recall`
suite (associative recall at 16/64/128 pairs, passkey at ~256/512/1024 tokens) on the three models, fp32 on
the CPU, plus any other model given with --model (e.g. a distilled one). Prints acc per task and model.
Offline: needs only `lt2convert fetch-asset smollm2-135m`.

    python scripts/eval_recall.py [--limit 20] [--tasks recall_passkey_256,...] [--work DIR] [--json out.json]
        [--model "full+gdn distilled=runs/a/final" ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from lt2convert.evaluate import evaluate, suite_specs  # noqa: E402
from lt2convert.io.assets import fetch_asset  # noqa: E402

CONVERSIONS = {
    "all-gdn (no distill)": ["--mix", "all-gdn"],
    "full+gdn 1:3 (no distill)": ["--recipe", "smollm2-135m-full-gdn"],
}


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "lt2convert.cli", *args], check=True, stdout=subprocess.DEVNULL)


def convert(teacher: Path, work: Path, name: str, plan_args: list[str]) -> Path:
    slug = name.split(" ")[0].replace(":", "-").replace("+", "-")
    plan, out = work / f"{slug}.yaml", work / slug
    if not (out / "config.json").is_file():
        cli("plan", str(teacher), *plan_args, "-o", str(plan))
        cli("convert", str(teacher), "--plan", str(plan), "-o", str(out), "--dtype", "fp32")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=20, help="Documents per task.")
    parser.add_argument("--tasks", help="Comma-separated subset of the recall suite (default: all of it).")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--work", help="Folder for the converted models (default: a temporary one).")
    parser.add_argument("--json", help="Also write the table as JSON here.")
    parser.add_argument("--model", action="append", default=[], help="NAME=PATH of another model; repeatable.")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    teacher = fetch_asset("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    tasks = args.tasks or ",".join(s.task for s in suite_specs("recall"))
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="eval-recall-"))
    work.mkdir(parents=True, exist_ok=True)
    models = {"smollm2-135m (teacher)": teacher}
    for name, plan_args in CONVERSIONS.items():
        models[name] = convert(teacher, work, name, plan_args)
    for extra in args.model:
        name, _, path = extra.partition("=")
        if not path:
            parser.error(f"--model {extra!r}: expected NAME=PATH")
        models[name] = Path(path)

    table: dict[str, dict[str, float]] = {}
    for name, folder in models.items():
        start = time.perf_counter()
        results = evaluate(
            str(folder), tasks=tasks, limit=args.limit, batch_size=args.batch_size, dtype="fp32", tokenizer=tokenizer
        )
        table[name] = {task: scores["acc,none"] for task, scores in results["results"].items()}
        print(f"{name}: {time.perf_counter() - start:.0f} s", file=sys.stderr)

    names = list(next(iter(table.values())))
    width = max(len(n) for n in table)
    print(f"recall acc (exact greedy continuation), {args.limit} documents per task, fp32 CPU")
    print(" " * width + "".join(f"  {t.removeprefix('recall_'):>12}" for t in names))
    for model, scores in table.items():
        print(f"{model:<{width}}" + "".join(f"  {scores[t]:>12.2f}" for t in names))
    if args.json:
        Path(args.json).write_text(json.dumps({"limit": args.limit, "acc": table}, indent=2))


if __name__ == "__main__":
    main()
