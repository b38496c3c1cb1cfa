"""``predict``: a model over images, folders, globs, manifests or standard input, into a file."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from .common import (BACKEND, CALIBRATION, FAST_DECODE, PRECISION, PRETRAINED, PRETRAINED_TAG, SOURCE_HELP,
                     VALIDATION, console, print_error)

if TYPE_CHECKING:
    from ..inference.spec import InferenceSpec

INPUTS_HELP = ("image files, folders (recursive), glob patterns ('photos/**/*.jpg'), manifests (.txt: a path per "
               "line; .csv/.tsv/.parquet: a path column) or - for paths on standard input")


def predict_cmd(
    checkpoint: str = typer.Argument(..., help=SOURCE_HELP + ", or an .onnx, .pte or .tflite file in a model or "
                                     "run folder (such as the int8 files quantize and export write)"),
    inputs: list[str] = typer.Argument(..., help=INPUTS_HELP),
    top: int = typer.Option(5, help="how many classes per image (at most the model's classes)"),
    threshold: Optional[float] = typer.Option(None, help="multi-label models: the probability from which a label "
                                              "is listed (default: the one the model was trained with)"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="write rows to FILE.csv, FILE.jsonl or "
                                          "FILE.parquet as the run goes (default: print them)"),
    resume: str = typer.Option("no", help="yes (bare --resume): finish the --output file an interrupted run left; "
                               "auto: finish it if it exists, else start"),
    embeddings: bool = typer.Option(False, "--embeddings", help="add the pooled features before the classifier "
                                    "to each row (retrieval, deduplication)"),
    precision: str = PRECISION,
    backend: str = BACKEND,
    calibration: Optional[str] = CALIBRATION,
    validation: Optional[str] = VALIDATION,
    batch_size: int = typer.Option(16, help="images per model call"),
    decode_workers: Optional[int] = typer.Option(None, help="decoding threads (default: measured with "
                                                 "--model-threads on the first batches)"),
    model_threads: Optional[int] = typer.Option(None, help="threads per model call (default: measured)"),
    exif: bool = typer.Option(True, "--exif/--no-exif", help="turn photos as their EXIF orientation says "
                              "(--no-exif: pixels as stored, as training reads them)"),
    fast_decode: bool = FAST_DECODE,
    json_output: bool = typer.Option(False, "--json", help="without --output: print JSON lines (an unreadable "
                                     "image is a row with an error; diagnostics go to standard error)"),
    ray: Optional[str] = typer.Option(None, help="run on Ray Data at ADDRESS (bare --ray: the running cluster, else "
                                      "a local one); --output is then a folder of Parquet files, one per block"),
    actors: Optional[int] = typer.Option(None, help="--ray: model actors (default: half the cluster's CPUs, "
                                         "over --model-threads each)"),
    pretrained: bool = PRETRAINED,
    pretrained_tag: Optional[str] = PRETRAINED_TAG,
) -> None:
    """Top classes (and embeddings) for every image; unreadable ones become error rows and the
    run goes on (exit code 1 when any failed). Killed at any point, --resume finishes the file;
    interrupted (Ctrl-C, SIGTERM), every finished row is written first (exit code 130)."""
    import json

    from ..checks import check_range
    from ..serving.collection import predict_collection
    from ..serving.inputs import check_sources
    from ..serving.outputs import as_dict, check_output
    from ..serving.pipeline import Prediction
    from ..serving.predict import InferenceSpec, Predictor

    check_range("top", top, 1)
    check_sources(inputs)
    check_range("actors", actors, 1)
    spec = InferenceSpec(checkpoint, precision, backend=backend, batch_size=batch_size, embeddings=embeddings,
                         exif=exif, fast_decode=fast_decode, decode_workers=decode_workers,
                         model_threads=model_threads, calibration=calibration, validation=validation,
                         threshold=threshold, pretrained=pretrained, pretrained_tag=pretrained_tag)
    if ray is not None:
        _on_ray(spec, inputs, top, output, ray, actors, resume)
        return
    if output is None and resume != "no":
        raise ValueError("--resume finishes an --output file: name it with --output")
    resuming = output is not None and check_output(output, resume, inputs)
    predictor = Predictor(spec)

    def show(row: Prediction) -> None:
        if json_output:  # every row, error rows included, is one JSON line
            print(json.dumps(as_dict(row)), flush=True)
        elif row.error is not None:
            print_error(row.error if row.path in row.error else f"{row.path}: {row.error}")
        else:
            console.print(f"[bold]{row.path}[/bold]", highlight=False)
            for name, p in row.top:
                console.print(f"  {p:7.2%}  {name}", highlight=False)

    try:
        with interrupt_on_sigterm():
            summary = predict_collection(predictor, inputs, top, output, resuming,
                                         on_row=show if output is None else None)
    except KeyboardInterrupt:
        if output is not None:
            typer.echo(f"interrupted: every finished row is in {output}; --resume finishes it", err=True)
        raise typer.Exit(130) from None
    if output is not None:  # the rows went to the file: say what was done (printed rows speak for themselves)
        resumed = f" ({summary.resumed:,} from before)" if summary.resumed else ""
        typer.echo(f"{summary.images:,} image(s){resumed}, {summary.failed:,} failed, "
                   f"{summary.images_per_second:,.1f} images/s; {summary.path_used}, {summary.split}; {output}", err=True)
        if summary.reason:
            typer.echo(f"path: {summary.reason}", err=True)
    if summary.failed:
        raise typer.Exit(1)


@contextmanager
def interrupt_on_sigterm() -> Iterator[None]:
    """SIGTERM raises ``KeyboardInterrupt``, as Ctrl-C does, so that the run unwinds the same way
    (its rows flushed) instead of dying where it stands."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _on_ray(spec: InferenceSpec, inputs: list[str], top: int, output: Path | None, address: str, actors: int | None,
            resume: str) -> None:
    from ..serving.ray_data import predict_on_ray

    if output is None:
        raise ValueError("--ray writes a folder of Parquet files: name it with --output")
    if resume != "no":
        raise ValueError("--resume finishes a local run; a Ray run retries lost work itself")
    rows, failed = predict_on_ray(spec, inputs, output, top, address, actors)
    typer.echo(f"{rows:,} image(s), {failed:,} failed, on Ray; Parquet files in {output}", err=True)
    if failed:
        raise typer.Exit(1)
