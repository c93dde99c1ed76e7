"""The shared overwrite policy: what may be replaced, staging leftovers of killed runs, permissions."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from lt2convert.cli import main
from lt2convert.io.outputs import (
    PARTIAL_MARKER,
    OutputError,
    atomic_directory,
    atomic_write_text,
    check_replaceable,
    remove_stale_partials,
)


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def leftover(parent, name: str, kind: str, pid: int):
    """A staging folder as a run leaves it (killed when `pid` is gone)."""
    import socket

    folder = parent / f".{name}.{kind}-{pid}"
    folder.mkdir()
    (folder / PARTIAL_MARKER).write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    return folder


def test_only_recognised_outputs_are_replaceable(tmp_path, monkeypatch):
    model, run, user = tmp_path / "model", tmp_path / "run", tmp_path / "user"
    for folder, marker in ((model, "provenance.json"), (run, "run.json"), (user, "notes.txt")):
        folder.mkdir()
        (folder / marker).write_text("{}")
    check_replaceable(model, "model")
    check_replaceable(run, "run")
    check_replaceable(tmp_path / "absent", "model")
    (tmp_path / "empty").mkdir()
    check_replaceable(tmp_path / "empty", "report")
    for target, kind in ((user, "model"), (run, "model"), (model, "report"), (model / "provenance.json", "plan")):
        with pytest.raises(OutputError, match=f"{target.name}: exists and is not"):
            check_replaceable(target, kind)
    monkeypatch.chdir(model)
    for target in (model, tmp_path, ".", ".."):
        with pytest.raises(OutputError, match="current directory or a folder above it"):
            check_replaceable(target, "model")


def test_stale_partials_are_removed_but_a_live_runs_is_not(tmp_path, capfd):
    stale = leftover(tmp_path, "out", "partial", dead_pid())
    live = leftover(tmp_path, "out", "partial", os.getpid())
    unmarked = tmp_path / ".out.partial-zzz"  # the name alone is not enough: not ours
    unmarked.mkdir()
    with atomic_directory(tmp_path / "out") as staging:
        (staging / "provenance.json").write_text("{}")
    assert not stale.exists() and live.exists() and unmarked.exists()
    assert f"removed {stale}" in capfd.readouterr().err
    assert not (tmp_path / "out" / PARTIAL_MARKER).exists()


def test_a_swap_killed_halfway_gets_the_previous_output_back(tmp_path):
    backup = leftover(tmp_path, "out", "old", dead_pid())
    (backup / "out").mkdir()
    (backup / "out" / "provenance.json").write_text("previous")
    assert remove_stale_partials(tmp_path / "out") == [backup]
    assert (tmp_path / "out" / "provenance.json").read_text() == "previous" and not backup.exists()


def test_atomic_text_files_respect_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "a" / "notes.md", "text")
    finally:
        os.umask(previous)
    assert path.read_text() == "text" and path.stat().st_mode & 0o777 == 0o644
    assert os.listdir(path.parent) == ["notes.md"]


def test_eval_limit_must_be_positive():
    result = CliRunner().invoke(main, ["eval", "tiny", "--suite", "local", "--limit", "-3"])
    assert result.exit_code == 2 and "--limit" in result.output and "-3" in result.output


def test_pipeline_fresh_never_deletes_the_current_directory(tmp_path, monkeypatch):
    from lt2convert.pipeline import PipelineError, prepare_output

    prepare_output(tmp_path / "p", {"source": "x"}, fresh=False)
    monkeypatch.chdir(tmp_path / "p")
    with pytest.raises(PipelineError, match="current directory"):
        prepare_output(tmp_path / "p", {"source": "x"}, fresh=True)
    assert (tmp_path / "p" / "pipeline.json").is_file()


def test_sigterm_is_an_interrupt_inside_the_block_only():
    import signal
    import time

    from lt2convert.io.outputs import sigterm_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # interrupted long before
    assert signal.getsignal(signal.SIGTERM) is before
