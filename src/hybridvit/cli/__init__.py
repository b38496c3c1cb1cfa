"""The ``hybridvit`` command: thin wrappers that call the public API and print.

Each group of commands lives in its own module and imports its heavy dependencies (torch,
timm, onnx) inside the command, so ``--help`` and the listing commands start fast.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import typer

try:  # newer typer carries its own copy of click
    from typer import _click as click
except ImportError:
    import click

from . import bench, deploy, models, plot, predict, serve, training
from ..checks import BindError
from .common import print_error

# The exit code of each kind of error (README, "Exit codes"), the first match wins. 1 is a run
# that finished with some inputs failed (predict), 130 an interrupted, resumable run.
EXIT_CODES: tuple[tuple[tuple[type[BaseException], ...], int], ...] = (
    ((BindError,), 5),  # serve: its address cannot be bound (a port in use, an address not on this machine)
    ((ConnectionError,), 4),  # the network or the Hub unreachable (HubUnreachableError)
    ((ImportError,), 3),  # an optional dependency missing: the message names the extra to install
    ((ValueError, TypeError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
      FileExistsError), 2),  # a bad value or input: option values, files, outputs (DataError, CheckpointError)
)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Hybrid convolution/transformer image classifiers.")

for _name, _command in (("models", models.models_cmd), ("info", models.info_cmd), ("forward", models.forward_cmd),
                        ("train", training.train_cmd), ("eval", training.eval_cmd),
                        ("predict", predict.predict_cmd), ("serve", serve.serve_cmd), ("export", deploy.export_cmd),
                        ("quantize", deploy.quantize_cmd), ("benchmark", bench.benchmark_cmd),
                        ("profile", bench.profile_cmd),
                        ("push", deploy.push_cmd), ("experiment", training.experiment_cmd), ("plot", plot.plot_cmd)):
    app.command(_name)(_command)


# Options that may stand alone for a default value (typer options cannot take an optional value).
BARE_VALUES = {"--resume": "yes", "--ray": "auto"}


def _bare_options_take_their_default(argv: list[str]) -> list[str]:
    """``--resume`` alone stands for ``--resume yes``, ``--ray`` alone for ``--ray auto``."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg in BARE_VALUES and (i + 1 == len(out) or out[i + 1].startswith("-")):
            out[i] = f"{arg}={BARE_VALUES[arg]}"
    return out


def _given_value(args: list[str], param: object) -> str | None:
    """What the command line gave the option ``param`` (click's message for a value it cannot
    convert does not repeat it), or ``None``."""
    for i, arg in enumerate(args):
        for opt in getattr(param, "opts", ()):
            if arg == opt and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith(opt + "="):
                return arg[len(opt) + 1:]
    return None


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``) and exit with its code; every
    error of EXIT_CODES (and every usage error) is one ``error: ...`` line, not a traceback."""
    args = _bare_options_take_their_default(list(sys.argv[1:] if argv is None else argv))
    try:
        code = app(args=args, prog_name="hybridvit", standalone_mode=False)
    except getattr(click.exceptions, "NoArgsIsHelpError", ()):  # the help is printed already
        code = 2
    except click.exceptions.UsageError as e:
        given = _given_value(args, getattr(e, "param", None))
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        print_error(e.format_message() + (f"; got {given!r}" if given is not None else "") + hint)
        code = e.exit_code
    except click.exceptions.ClickException as e:
        print_error(e.format_message())
        code = e.exit_code
    except typer.Abort:
        code = 1
    except Exception as e:
        code = next((c for kinds, c in EXIT_CODES if isinstance(e, kinds)), None)
        if code is None:  # a bug: the traceback is what helps
            raise
        print_error(str(e))
    raise SystemExit(code or 0)
