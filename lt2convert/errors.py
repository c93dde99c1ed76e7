"""The one exception base of lt2convert: the CLI prints an `LT2Error` as one line and any other error in full.

A leaf module (imports nothing from the project) so that every stage can raise these without import cycles.
"""

from __future__ import annotations


class LT2Error(Exception):
    """A problem with the user's input, files or environment that lt2convert diagnosed itself.

    Its message is complete on its first line; anything that is not an LT2Error is a bug and keeps its traceback.
    """


class ConfigError(LT2Error, ValueError):
    """A setting, option or config file field that cannot be used; the message names the file and field."""


class OutputExistsError(LT2Error, FileExistsError):
    """An output path is taken (by an earlier result or by something lt2convert did not write)."""


class InputNotFoundError(LT2Error, FileNotFoundError):
    """A named input file or folder does not exist or is not what the command needs."""


class DiskFullError(LT2Error, OSError):
    """The device ran out of room while writing an output; the message names the output."""


class AssetError(LT2Error, RuntimeError):
    """An asset could not be obtained or built (offline, corrupt download, unexpected archive layout)."""


class PlanError(ConfigError):
    """A plan, recipe or strategy that cannot be used; the one-line message names every offending field."""

    def __init__(self, origin: str, problems: list[str]):
        super().__init__(f"{origin}: {'; '.join(problems)}")
        self.problems = problems
