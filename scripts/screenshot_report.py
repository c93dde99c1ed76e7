"""Render a report's index.html in headless Chromium to a PNG (for the README or a pull request), at a laptop's
width, and say whether the page scrolls sideways there.

    python scripts/screenshot_report.py runs/smollm2-135m/report -o docs/report.png [--width 1400 --height 2400]

Needs the `chromium` command (Debian: apt-get install chromium).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Appended to a copy of the page: writes the document's width into the title, which --dump-dom then shows.
MEASURE = ("<script>document.title = 'scroll-width=' + document.documentElement.scrollWidth + "
           "' client-width=' + document.documentElement.clientWidth;</script>")


def chromium_flags(profile: Path) -> list[str]:
    return ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
            f"--user-data-dir={profile}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="a report folder (with index.html) or the index.html itself")
    parser.add_argument("-o", "--output", type=Path, default=Path("report.png"))
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=2400)
    args = parser.parse_args()
    page = args.report / "index.html" if args.report.is_dir() else args.report
    if not page.is_file():
        print(f"error: {page}: no such report page", file=sys.stderr)
        return 1
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("error: no chromium command (Debian: apt-get install chromium)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        flags = [browser, *chromium_flags(Path(tmp) / "profile"), f"--window-size={args.width},{args.height}"]
        args.output.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([*flags, f"--screenshot={args.output.resolve()}", page.resolve().as_uri()],
                       capture_output=True, timeout=120, check=False)
        measured = Path(tmp) / "measure.html"
        measured.write_text(page.read_text(encoding="utf-8").replace("</body>", MEASURE + "</body>"), encoding="utf-8")
        dom = subprocess.run([*flags, "--dump-dom", measured.as_uri()], capture_output=True, text=True, timeout=120,
                             check=False).stdout
    if not args.output.is_file():
        print(f"error: chromium wrote no screenshot to {args.output}", file=sys.stderr)
        return 1
    widths = dom.split("<title>", 1)[-1].split("</title>", 1)[0]
    print(f"wrote {args.output} ({args.width}×{args.height}); {widths}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
