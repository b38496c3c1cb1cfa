"""What the command modules share: the console, number formatting and the model-source options."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

console = Console()
if not console.is_terminal:  # pipes and CI logs: don't squeeze tables into 80 columns
    console = Console(width=200)

SOURCE_HELP = "model folder, training run folder, checkpoint.pt, hf-hub:ORG/NAME[@REVISION], or a model name with --pretrained"
PRETRAINED = typer.Option(False, "--pretrained", help="a model name: use its published weights")
PRETRAINED_TAG = typer.Option(None, "--pretrained-tag", help="which published weights (see `hybridvit models`; "
                              "default: the first)")
FAST_DECODE = typer.Option(False, "--fast-decode", help="JPEG: decode at 1/2-1/8 scale where the resize "
                           "shrinks that much anyway (faster; not the same pixels)")


def fmt(value: float | None, spec: str = ",.0f") -> str:
    return "-" if value is None else format(value, spec)


def output_folder(source: str) -> Path:
    """Where a command writes next to a local model; the current folder for Hub and published weights."""
    path = Path(source)
    if not path.exists():
        return Path.cwd()
    return path if path.is_dir() else path.parent


def print_error(message: str) -> None:
    """One ``error: ...`` line (not wrapped, the message's own brackets shown as they are)."""
    console.print(f"[red]error:[/red] {escape(' '.join(message.split()))}", highlight=False, soft_wrap=True)
