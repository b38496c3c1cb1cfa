"""The ``hybridvit`` command: thin wrappers that call the public API and print.

Each group of commands lives in its own module and imports its heavy dependencies (torch,
timm, onnx) inside the command, so ``--help`` and the listing commands start fast.
"""

from __future__ import annotations

import sys

import typer

from . import bench, deploy, models, plot, training
from .common import console

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Hybrid convolution/transformer image classifiers.")

for _name, _command in (("models", models.models_cmd), ("info", models.info_cmd), ("forward", models.forward_cmd),
                        ("train", training.train_cmd), ("eval", training.eval_cmd),
                        ("predict", deploy.predict_cmd), ("export", deploy.export_cmd),
                        ("quantize", deploy.quantize_cmd), ("benchmark", bench.benchmark_cmd),
                        ("push", deploy.push_cmd), ("experiment", training.experiment_cmd), ("plot", plot.plot_cmd)):
    app.command(_name)(_command)


def _bare_resume_means_yes(argv: list[str]) -> list[str]:
    """``train --resume`` alone stands for ``--resume yes`` (typer options cannot take an optional value)."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--resume" and (i + 1 == len(out) or out[i + 1].startswith("-")):
            out[i] = "--resume=yes"
    return out


def main() -> None:
    try:
        app(args=_bare_resume_means_yes(sys.argv[1:]))
    except (ValueError, TypeError, FileNotFoundError) as e:  # user errors (incl. DataError): a message, not a traceback
        console.print(f"[red]error:[/red] {e}", highlight=False)
        raise SystemExit(2) from None
