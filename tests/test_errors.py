"""One exception base: the CLI prints an LT2Error as one line and lets any other error keep its traceback."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from lt2convert import summary
from lt2convert.cli import main
from lt2convert.distill.data import DataError
from lt2convert.distill.train import TrainingDiverged
from lt2convert.errors import ConfigError, LT2Error
from lt2convert.evaluate import EvalError
from lt2convert.io.assets import AssetError
from lt2convert.io.checkpoint import CheckpointError
from lt2convert.io.hub import SourceError
from lt2convert.io.outputs import OutputError
from lt2convert.pipeline import PipelineError
from lt2convert.plan import PlanError
from lt2convert.presets import UnknownPresetError


@pytest.mark.parametrize(
    ("error", "old_base"),
    [
        (PlanError, ValueError),
        (UnknownPresetError, ValueError),
        (EvalError, ValueError),
        (DataError, ValueError),
        (OutputError, ValueError),
        (SourceError, ValueError),
        (CheckpointError, ValueError),
        (PipelineError, ValueError),
        (ConfigError, ValueError),
        (TrainingDiverged, RuntimeError),
        (AssetError, RuntimeError),
    ],
)
def test_every_error_has_the_one_base_and_keeps_its_old_one(error, old_base):
    assert issubclass(error, LT2Error) and issubclass(error, old_base)


def inspect_raising(monkeypatch, error: Exception):
    def raising(source: str) -> dict:
        raise error

    monkeypatch.setattr(summary, "inspect_source", raising)
    monkeypatch.delenv("LT2CONVERT_DEBUG", raising=False)
    return CliRunner().invoke(main, ["inspect", "anything"], catch_exceptions=False)


def test_an_lt2_error_is_one_line_and_a_non_zero_exit(monkeypatch):
    result = inspect_raising(monkeypatch, ConfigError("plan.yaml: lora.r: expected an integer\nmore detail"))
    assert result.exit_code == 1
    assert result.output.strip() == "Error: plan.yaml: lora.r: expected an integer"


def test_any_other_error_keeps_its_traceback(monkeypatch):
    with pytest.raises(RuntimeError, match="CUDA error: an illegal memory access"):
        inspect_raising(monkeypatch, RuntimeError("CUDA error: an illegal memory access"))
    with pytest.raises(ValueError, match="shape mismatch"):
        inspect_raising(monkeypatch, ValueError("shape mismatch"))


def test_a_click_usage_error_is_still_one_line():
    result = CliRunner().invoke(main, ["inspect"])
    assert result.exit_code == 2 and "Missing argument 'SOURCE'" in result.output and "Traceback" not in result.output


def test_the_file_system_refusing_a_named_file_is_one_line_but_other_os_errors_are_not(monkeypatch):
    import errno

    denied = PermissionError(errno.EACCES, "Permission denied", "runs/out/plan.yaml")
    result = inspect_raising(monkeypatch, denied)
    assert result.exit_code == 1
    assert result.output.strip() == "Error: runs/out/plan.yaml: Permission denied"
    with pytest.raises(OSError, match="Bad file descriptor"):  # no file named: a bug, with its traceback
        inspect_raising(monkeypatch, OSError(errno.EBADF, "Bad file descriptor"))
