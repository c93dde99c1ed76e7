"""Where commands write: one overwrite policy, atomic writes, and the clean-up of what killed runs left behind.

The policy, for every command that writes (convert, plan, distill, report, pipeline; eval only adds new dated
files):
    - an existing output is replaced only when lt2convert wrote it, recognised by its marker (a model folder's
      provenance.json, a plan's header line, a distill run's run.json, a report's marker file);
    - anything else is refused, naming it;
    - the current directory, or a folder above it, is never replaced or deleted.

Outputs are built beside their target (`.NAME.partial-*`) and renamed into place when complete. A staging folder
holds a marker naming the process that made it, so the next write into the same place removes the ones left by
runs that were killed (and only those), and a concurrent run's staging is left alone.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from lt2convert.errors import DiskFullError, LT2Error, OutputExistsError

PARTIAL_MARKER = ".lt2convert-partial"  # inside a staging folder: {"pid": ..., "host": ...}
REPORT_MARKER = ".lt2convert-report"  # inside a report folder
PLAN_HEADER = "# lt2convert plan"  # the first line of every plan file written


class OutputError(LT2Error, ValueError):
    """An output path that must not be written: it holds something lt2convert did not write."""


def _is_model_folder(path: Path) -> bool:
    return path.is_dir() and (path / "provenance.json").is_file()


def _is_run_folder(path: Path) -> bool:
    return path.is_dir() and (path / "run.json").is_file()


def _is_report_folder(path: Path) -> bool:
    # Reports written before the marker existed hold exactly these two files.
    legacy = {p.name for p in path.iterdir()} == {"leaderboard.md", "index.html"} if path.is_dir() else False
    return path.is_dir() and ((path / REPORT_MARKER).is_file() or legacy)


def _is_plan_file(path: Path) -> bool:
    if not path.is_file():
        return False
    with path.open("rb") as handle:
        return handle.read(len(PLAN_HEADER)) == PLAN_HEADER.encode()


def _is_bench_file(path: Path) -> bool:
    """A JSON object with the keys `lt2convert bench` writes."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and {"models", "contexts", "decode_tokens", "context_mode"} <= data.keys()


def _inside_run_folder(path: Path) -> bool:
    """stages/<k>-<stage>/ and final/ of a distill run belong to the run."""
    return any((parent / "run.json").is_file() for parent in list(Path(path).absolute().parents)[:2])


# kind -> (recognises an output of that kind, how to call it in a refusal)
KINDS: dict[str, tuple[Callable[[Path], bool], str]] = {
    "model": (_is_model_folder, "a model folder written by lt2convert (no provenance.json)"),
    "run": (_is_run_folder, "a distill run folder (no run.json)"),
    "report": (_is_report_folder, f"an earlier report folder (no {REPORT_MARKER})"),
    "plan": (_is_plan_file, f"a plan file written by lt2convert (its first line is not '{PLAN_HEADER}')"),
    "run-output": (_inside_run_folder, "inside a distill run folder"),
    "bench": (_is_bench_file, "a bench result written by `lt2convert bench`"),
}


def is_current_or_parent(path: Path) -> bool:
    """True for the current directory and every folder above it (replacing them would pull the floor away)."""
    here = Path.cwd().resolve()
    target = Path(path).resolve()
    return target == here or target in here.parents


def check_replaceable(target: Path, kind: str) -> None:
    """Raise OutputError unless `target` is absent, an empty folder, or an output of `kind` that lt2convert wrote
    (and in any case when it is the current directory or above it)."""
    target = Path(target)
    if not (target.exists() or target.is_symlink()):
        return
    if is_current_or_parent(target):
        raise OutputError(f"{target}: is the current directory or a folder above it; never replaced")
    if target.is_dir() and not target.is_symlink() and not any(target.iterdir()):
        return
    recognise, description = KINDS[kind]
    if target.is_symlink() or not recognise(target):
        raise OutputError(f"{target}: exists and is not {description}; not replacing it (choose another output)")


# ----------------------------------------------------------------------------------------------- permissions


def current_umask() -> int:
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


_UMASK_LOCK = threading.Lock()


def normal_permissions(path: Path) -> None:
    """mkdtemp and mkstemp create owner-only entries; give a finished output the mode a plain mkdir or open
    would have (the umask decides), so another user or a serving account can read it."""
    mask = current_umask()
    path = Path(path)
    if path.is_dir():
        os.chmod(path, 0o777 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


# ----------------------------------------------------------------------------------------- staging leftovers


def _marker_owner(staging: Path) -> tuple[int, str] | None:
    try:
        data = json.loads((staging / PARTIAL_MARKER).read_text())
        return int(data["pid"]), str(data["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_partials(target: Path) -> list[Path]:
    """Staging folders of `target` left by killed lt2convert runs on this machine: the name pattern and the
    marker must both match, and the process named in the marker must be gone."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    found = []
    for pattern in (f".{target.name}.partial-*", f".{target.name}.old-*"):
        for candidate in target.parent.glob(pattern):
            owner = _marker_owner(candidate) if candidate.is_dir() else None
            if owner and owner[1] == socket.gethostname() and not _alive(owner[0]):
                found.append(candidate)
    return sorted(found)


def remove_stale_partials(target: Path, warn: Callable[[str], None] | None = None) -> list[Path]:
    """Remove what `stale_partials` finds. A run killed in the middle of swapping an output leaves the previous
    output in an `.old-*` folder and nothing at `target`: that one is put back, not removed."""
    target = Path(target)
    removed = stale_partials(target)
    for stale in removed:
        kept = stale / target.name
        if stale.name.startswith(f".{target.name}.old-") and kept.exists() and not target.exists():
            kept.rename(target)
        shutil.rmtree(stale, ignore_errors=True)
        if warn is not None:
            warn(f"removed {stale}, left by an interrupted run")
    return removed


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def _make_staging(target: Path, kind: str) -> Path:
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.{kind}-", dir=target.parent))
    (staging / PARTIAL_MARKER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    return staging


def _named_disk_full(err: OSError, target: Path) -> OSError:
    """ENOSPC (and the quota error) name no path; say which output ran out of room."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(err.errno, f"{target}: no space left on the device while writing it (nothing was kept)")
    return err


# --------------------------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_directory(target: Path, overwrite: bool = False, kind: str = "model") -> Iterator[Path]:
    """Yield an empty temporary folder beside `target`; on success it replaces `target`, on any failure it is
    removed, so `target` is never left half-written. An existing `target` is replaced only with `overwrite` and
    only when it is an output of `kind` (see `check_replaceable`)."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise OutputExistsError(f"{target}: already exists (pass --overwrite to replace it)")
    check_replaceable(target, kind)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(target, warn=_note)
    staging = _make_staging(target, "partial")
    try:
        yield staging
        (staging / PARTIAL_MARKER).unlink()
        normal_permissions(staging)
        swap_folder(staging, target)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        named = _named_disk_full(err, target)
        if named is err:
            raise
        raise named from err
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def swap_folder(finished: Path, target: Path) -> None:
    """Rename the finished folder onto `target` with no moment where a half-written folder has that name. An
    existing `target` is first moved into an `.old-*` staging folder (put back by `remove_stale_partials` if the
    process dies right then) and removed once the new folder is in place."""
    if not target.exists():
        finished.rename(target)
        return
    backup = _make_staging(target, "old")
    target.rename(backup / target.name)
    finished.rename(target)
    shutil.rmtree(backup, ignore_errors=True)  # the swap is done; a leftover is a stale partial for the next run


def atomic_write(path: Path, write: Callable[[IO], None], kind: str | None = None, binary: bool = False,
                 replace: bool = True) -> Path:
    """Call `write` on a temporary file beside `path`, then publish it as `path` with the mode a plain open would
    give (the umask decides). With `kind`, an existing file is replaced only when it is an output of that kind
    (see `check_replaceable`); with `replace=False` an existing file is never replaced (OutputExistsError)."""
    path = Path(path)
    if kind is not None:
        check_replaceable(path, kind)
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; expected a file path")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else "utf-8") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        normal_permissions(Path(tmp))
        _publish(Path(tmp), path, replace)
    except OSError as err:
        named = _named_disk_full(err, path)
        if named is err:
            raise
        raise named from err
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def _publish(tmp: Path, path: Path, replace: bool) -> None:
    if replace:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # atomic, and refuses a name that exists
    except FileExistsError:
        raise OutputExistsError(f"{path}: exists; not replacing an earlier result") from None


def atomic_write_text(path: Path, text: str, kind: str | None = None) -> Path:
    """Write a text file through a temporary sibling renamed into place (see `atomic_write`)."""
    return atomic_write(path, lambda handle: handle.write(text), kind=kind)


# ---------------------------------------------------------------------------------------------------- signals


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM (sent by `timeout`, SLURM, `docker stop`) like Ctrl-C while the block runs, so the same
    clean-up runs: staging folders removed, nothing half-written left in place."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
