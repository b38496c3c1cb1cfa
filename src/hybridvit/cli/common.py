"""What the command modules share: the console, number formatting and the model-source options."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

console = Console()
if not console.is_terminal:  # pipes and CI logs: don't squeeze tables into 80 columns
    console = Console(width=200)
errors = Console(stderr=True, width=None if Console(stderr=True).is_terminal else 200)  # diagnostics: stdout stays data

SOURCE_HELP = "model folder, training run folder, checkpoint.pt, hf-hub:ORG/NAME[@REVISION], or a model name with --pretrained"
PRETRAINED = typer.Option(False, "--pretrained", help="a model name: use its published weights")
PRETRAINED_TAG = typer.Option(None, "--pretrained-tag", help="which published weights (see `hybridvit models`; "
                              "default: the first)")
FAST_DECODE = typer.Option(False, "--fast-decode", help="JPEG: decode at 1/2-1/8 scale where the resize "
                           "shrinks that much anyway (faster; not the same pixels)")
# predict and serve: the inference path (``optimize``) and the images int8 is calibrated and checked on
PRECISION = typer.Option("auto", help="auto (the fastest path measured here; int8 too with --validation), fp32, "
                         "bf16, int8 or int8-static (needs --calibration)")
BACKEND = typer.Option("auto", help="auto, onnxruntime, openvino, torchscript or nncf (int8-static: NNCF's "
                       "quantization, in OpenVINO)")
CALIBRATION = typer.Option(None, metavar="DIR", help="images to calibrate static int8 on (the train split of an "
                           "ImageNet-layout folder, or a folder of images)")
VALIDATION = typer.Option(None, metavar="DIR", help="with --precision auto: int8 is also weighed, kept only when its "
                          "top-1 agrees with fp32 on 99% of these images (the val split of an ImageNet-layout "
                          "folder, or a folder of images)")


def fmt(value: float | None, spec: str = ",.0f") -> str:
    return "-" if value is None else format(value, spec)


def output_folder(source: str) -> Path:
    """Where a command writes next to a local model; the current folder for Hub and published weights."""
    path = Path(source)
    if not path.exists():
        return Path.cwd()
    return path if path.is_dir() else path.parent


def print_error(message: str) -> None:
    """One ``error: ...`` line on standard error (not wrapped, the message's own brackets shown as they are)."""
    errors.print(f"[red]error:[/red] {escape(' '.join(message.split()))}", highlight=False, soft_wrap=True)
