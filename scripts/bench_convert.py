"""Conversion throughput and memory on a full-size checkpoint, next to a plain copy of the same files.

Writes (once, into the lt2convert cache) a random checkpoint with Ouro-1.4B's exact shapes, then times in
separate processes, one run each: a plain copy of the folder, and `lt2convert convert` with the default
Full+GDN plan. Prints wall time, the time after imports (the conversion itself), MB/s of input read and
peak RSS of each.

    python scripts/bench_convert.py [--layers 24] [--recipe ouro-1.4b-full-gdn]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lt2convert.io.assets import cache_dir

MEASURE_HOOK = """
import atexit, json, sys, time
_report_file = sys.argv.pop(1)
_begun = time.perf_counter()
def _begin():
    # Called once the imports are done: the work time then excludes interpreter and library start-up.
    global _begun
    _begun = time.perf_counter()
def _report():
    # VmHWM is this process's own high-water mark (ru_maxrss would include the parent's, copied at fork).
    peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    json.dump({"peak": peak, "work": time.perf_counter() - _begun}, open(_report_file, "w"))
atexit.register(_report)
"""


def measured(code: str, args: list[str]) -> dict:
    """Wall seconds, work seconds (after imports) and peak RSS bytes of `code` run in a fresh Python process
    with `args` as sys.argv[1:]."""
    # Flush earlier writes first: otherwise a step pays for writing back the previous step's dirty pages.
    os.sync()
    with tempfile.NamedTemporaryFile(suffix=".json") as report:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", MEASURE_HOOK + code, report.name, *args], check=True)
        wall = time.perf_counter() - start
        return {"wall": wall, **json.loads(Path(report.name).read_text())}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--recipe", default="ouro-1.4b-full-gdn")
    args = parser.parse_args()
    source = cache_dir() / "bench" / f"ouro-1.4b-random-{args.layers}l"
    if not (source / "config.json").is_file():
        print(f"writing a random Ouro-1.4B-shaped checkpoint to {source} ...", flush=True)
        from lt2convert.testing import write_full_size_ouro

        write_full_size_ouro(source, num_layers=args.layers)
    size = folder_bytes(source)
    python = sys.executable
    with tempfile.TemporaryDirectory(dir=source.parent) as tmp:
        tmp = Path(tmp)
        copy = measured("import shutil; _begin(); shutil.copytree(sys.argv[1], sys.argv[2])",
                        [str(source), str(tmp / "copy")])
        plan = tmp / "plan.yaml"
        subprocess.run([python, "-m", "lt2convert.cli", "plan", str(source), "--recipe", args.recipe, "-o",
                        str(plan)], check=True, capture_output=True)
        convert = measured(
            "from lt2convert.cli import main; _begin(); main(sys.argv[1:], standalone_mode=False)",
            ["convert", str(source), "--plan", str(plan), "-o", str(tmp / "hybrid")],
        )
        out_size = folder_bytes(tmp / "hybrid")
        shutil.rmtree(tmp / "copy")
    print(f"\ninput: {size / 1e9:.2f} GB ({args.layers} layers, bf16); output {out_size / 1e9:.2f} GB; "
          f"recipe {args.recipe}; {os.cpu_count()} CPUs")
    print(f"{'step':<12}{'wall s':>8}{'work s':>8}{'MB/s (work)':>13}{'peak RSS':>11}")
    for name, run in (("plain copy", copy), ("convert", convert)):
        print(f"{name:<12}{run['wall']:8.1f}{run['work']:8.1f}{size / 1e6 / run['work']:13.0f}"
              f"{run['peak'] / 1e9:9.2f} GB")
    print(f"convert / copy: {convert['wall'] / copy['wall']:.2f}× wall, {convert['work'] / copy['work']:.2f}× work "
          "(work = after imports: interpreter, torch and transformers start-up excluded)")


if __name__ == "__main__":
    main()
