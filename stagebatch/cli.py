"""The ``stagebatch`` command line: one typer app wiring the packages together.

Each command lives in its own package (``slicing.cli``, ``loadtest.cli``, ``stagebatch.commands``)
and does its heavy imports inside the function, so ``stagebatch --help`` stays fast. This module is
the only place where a :class:`~stagebatch.errors.StagebatchError` becomes a one-line message and
an exit code.
"""

from __future__ import annotations

import sys

import typer

from stagebatch.errors import StagebatchError

app = typer.Typer(
    name="stagebatch",
    help="Stage-level batching on NVIDIA Triton, and a characterization of batching systems.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# ---- command registrations (one line each; keep this block sorted by package) ----
from stagebatch import commands as _commands  # noqa: E402

app.command("serve")(_commands.serve)
app.command("doctor")(_commands.doctor)
# [cli-registrations] helpers add their one-line registrations below this marker
app.command("build")(__import__("slicing.cli", fromlist=["build"]).build)
app.command("characterize")(__import__("loadtest.cli", fromlist=["characterize"]).characterize)
app.command("capacity")(__import__("loadtest.cli", fromlist=["capacity"]).capacity)
app.command("report")(__import__("loadtest.cli", fromlist=["report"]).report)
app.command("infer")(__import__("stagebatch.infer", fromlist=["infer"]).infer)
app.command("simulate")(__import__("tuning.cli", fromlist=["simulate"]).simulate)
app.command("tune")(__import__("tuning.cli", fromlist=["tune"]).tune)
# ---- end of registrations ----


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; a StagebatchError becomes one line on stderr and exit code 1."""
    try:
        # In non-standalone mode click returns the exit code of a typer.Exit instead of raising it.
        outcome = app(args=argv, standalone_mode=False)
    except StagebatchError as error:
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
        return 1
    except typer.Exit as done:
        return done.exit_code
    except typer.Abort:
        typer.secho("aborted", err=True)
        return 130
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(error, click.exceptions.ClickException):
            error.show()
            return error.exit_code
        raise
    return outcome if isinstance(outcome, int) else 0


if __name__ == "__main__":
    sys.exit(main())
