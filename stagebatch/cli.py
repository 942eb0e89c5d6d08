"""The ``stagebatch`` command line: one typer app wiring the packages together.

Each command lives in its own package (``tuning.cli``, ``loadtest.cli``, ``slicing.cli``,
``stagebatch.commands``) and imports heavy third-party libraries inside the function, so
``stagebatch --help`` stays fast. This module is
the only place where a :class:`~core.errors.StagebatchError` becomes a one-line message and
an exit code.
"""

from __future__ import annotations

import sys

import typer

from loadtest import cli as loadtest_cli
from loadtest import compare
from slicing import cli as slicing_cli
from stagebatch import commands, infer
from core.errors import StagebatchError
from tuning import cli as tuning_cli

app = typer.Typer(
    name="stagebatch",
    help="Stage-level batching on NVIDIA Triton, and a characterization of batching systems.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Usage errors derive from the ClickException of the click that typer uses (typer >= 0.20 vendors
# its own as typer._click; older typer uses click itself): BadParameter's base in both cases.
_CLICK_EXCEPTION = next(cls for cls in typer.BadParameter.__mro__ if cls.__name__ == "ClickException")

# ---- command registrations: one line each, by package, top layer first ----
app.command("simulate")(tuning_cli.simulate)
app.command("tune")(tuning_cli.tune)
app.command("characterize")(loadtest_cli.characterize)
app.command("capacity")(loadtest_cli.capacity)
app.command("report")(loadtest_cli.report)
app.command("compare")(compare.compare)
app.command("build")(slicing_cli.build)
app.command("serve")(commands.serve)
app.command("supervise")(commands.supervise)
app.command("doctor")(commands.doctor)
app.command("infer")(infer.infer)
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
    except _CLICK_EXCEPTION as error:  # usage errors arrive here in non-standalone mode
        error.show()
        return error.exit_code
    return outcome if isinstance(outcome, int) else 0


if __name__ == "__main__":
    sys.exit(main())
