"""Conversion throughput and memory on a full-size checkpoint, next to a plain copy of the same files.

Writes (once, into the lt2convert cache) a random checkpoint with Ouro-1.4B's exact shapes, then times in
separate processes, one run each: a plain copy of the folder, and `lt2convert convert` with the default
Full+GDN plan. Prints wall time, MB/s of input read and peak RSS of each.

    python scripts/bench_convert.py [--layers 24] [--recipe ouro-1.4b-full-gdn]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lt2convert.io.assets import cache_dir

PEAK_RSS_HOOK = """
import atexit, sys
_peak_file = sys.argv.pop(1)
def _report_peak():
    # VmHWM is this process's own high-water mark (ru_maxrss would include the parent's, copied at fork).
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            open(_peak_file, "w").write(str(int(line.split()[1]) * 1024))
atexit.register(_report_peak)
"""


def measured(code: str, args: list[str]) -> tuple[float, int]:
    """(seconds, peak RSS in bytes) of `code` run in a fresh Python process with `args` as sys.argv[1:]."""
    with tempfile.NamedTemporaryFile(suffix=".rss") as peak:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", PEAK_RSS_HOOK + code, peak.name, *args], check=True)
        seconds = time.perf_counter() - start
        return seconds, int(Path(peak.name).read_text())


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
        copy = measured("import shutil; shutil.copytree(sys.argv[1], sys.argv[2])", [str(source), str(tmp / "copy")])
        plan = tmp / "plan.yaml"
        subprocess.run([python, "-m", "lt2convert.cli", "plan", str(source), "--recipe", args.recipe, "-o",
                        str(plan)], check=True, capture_output=True)
        # Random weights have no tokenizer to calibrate with, so the benchmark uses the uncalibrated inits.
        convert = measured(
            "from lt2convert.cli import main; main(sys.argv[1:], standalone_mode=False)",
            ["convert", str(source), "--plan", str(plan), "-o", str(tmp / "hybrid"), "--init-gdn-norm", "unit"],
        )
        out_size = folder_bytes(tmp / "hybrid")
        shutil.rmtree(tmp / "copy")
    print(f"\ninput: {size / 1e9:.2f} GB ({args.layers} layers, bf16); output {out_size / 1e9:.2f} GB; "
          f"recipe {args.recipe}; {os.cpu_count()} CPUs")
    print(f"{'step':<12}{'seconds':>9}{'MB/s':>9}{'peak RSS':>11}")
    for name, (seconds, rss) in (("plain copy", copy), ("convert", convert)):
        print(f"{name:<12}{seconds:9.1f}{size / 1e6 / seconds:9.0f}{rss / 1e9:9.2f} GB")
    print(f"convert / copy time: {convert[0] / copy[0]:.2f}×")


if __name__ == "__main__":
    main()
