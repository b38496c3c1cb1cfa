"""``export``, ``quantize`` and ``push``: shipping a trained model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import PRETRAINED, PRETRAINED_TAG, SOURCE_HELP, console, output_folder


def _check_output(output: Path | None, checkpoint: str, format: str = "onnx") -> None:
    """The output file, or the folder the default one goes to, can be written: checked before any work."""
    from ..checks import check_output_file, check_output_folder

    if output is None:
        check_output_folder(output_folder(checkpoint))
    elif format == "coreml":
        from ..inference.edge import check_output_path

        check_output_path(output, format)  # a package is a folder
    else:
        check_output_file(output)


def export_cmd(
    checkpoint: str = typer.Argument(..., help=SOURCE_HELP),
    format: str = typer.Option("onnx", help="onnx, torchscript, exported-program, or for devices (batch 1, checked "
                               "in the runtime; a JSON beside the file: classes and preprocessing) executorch "
                               "(XNNPACK), litert (with the metadata MediaPipe's image classifier reads) or "
                               "coreml (an image classifier .mlpackage)"),
    output: Optional[Path] = typer.Option(None, help="output file (default: MODEL_NAME.EXT in the checkpoint's folder, "
                                          "else the current one)"),
    opset: int = typer.Option(17, help="ONNX opset"),
    dynamic_size: bool = typer.Option(False, "--dynamic-size", help="ONNX: leave height and width free too "
                                      "(LeViT: attention biases computed in the graph)"),
    int8: bool = typer.Option(False, "--int8", help="devices: static int8 (Core ML: int8 weights), calibrated on "
                              "--calibration and refused under 99% top-1 agreement on held-out images"),
    calibration: Optional[Path] = typer.Option(None, help="devices: image folder to calibrate int8 and to check the "
                                               "file on (ImageNet layout: its train split; any images)"),
    images: int = typer.Option(128, min=1, help="devices: calibration images (a seeded random subset)"),
    pretrained: bool = PRETRAINED,
    pretrained_tag: Optional[str] = PRETRAINED_TAG,
) -> None:
    """Write the fused model with a dynamic batch dimension (ONNX files are checked in ONNX Runtime),
    or a program for a device runtime, checked in that runtime before it is written."""
    import importlib.util

    from ..api import load_source
    from ..inference.export import DEVICE_FORMATS, FORMATS, check_export, check_onnx, export

    check_export(format, opset, dynamic_size)  # options and output first: loading takes seconds
    device = format in DEVICE_FORMATS
    if (int8 or calibration) and not device:
        raise typer.BadParameter("--int8 and --calibration go with --format executorch, litert or coreml")
    if int8 and calibration is None:
        raise typer.BadParameter("--int8 needs --calibration DIR: images to calibrate on and to check against")
    _check_output(output, checkpoint, format)
    model, extra = load_source(checkpoint, pretrained, pretrained_tag)
    if dynamic_size and hasattr(model.config, "dynamic_size"):
        model = model.reconfigured(dynamic_size=True)  # the same weights serve any size
    target = output or output_folder(checkpoint) / f"{model.model_name or 'model'}{'_int8' if int8 else ''}{FORMATS[format]}"
    if device:
        _export_device(model, extra, target, format, int8, calibration, images)
        return
    export(model, target, format, opset=opset, dynamic_size=dynamic_size)
    h, w = model.input_hw
    console.print(f"wrote {target} ({format}, fused, dynamic batch{', height and width' if dynamic_size else ''})")
    if format == "onnx":
        if importlib.util.find_spec("onnxruntime") is None:
            console.print("onnxruntime is not installed: the file was not checked")
            return
        # other sizes: larger, non-square and odd
        sizes = [(h, w)] + ([(h + h // 2, w), (h - h // 4 + 1, w + w // 4 + 3)] if dynamic_size else [])
        for size in sizes:
            difference = check_onnx(target, model, size=size)
            console.print(f"ONNX Runtime vs PyTorch at {size[0]}x{size[1]}: max relative difference {difference:.2e}")


def _export_device(model, extra: dict, target: Path, format: str, int8: bool, calibration: Path | None,
                   images: int) -> None:
    """``export --format executorch|litert|coreml``: calibration and check images, the export, its report."""
    import torch

    from ..inference.edge import export_edge
    from ..inference.quantize import calibration_set

    calibrate = check = None
    if calibration is not None:  # a quarter more, held out from calibration, to check the file on
        data = calibration_set(calibration, model, images + max(images // 4, 16), 16, crop_pct=extra.get("crop_pct"))
        held_out = max(images // 4, 16) if data.images > images else 0
        pool = torch.cat(data.batches)
        check = pool[len(pool) - held_out:] if held_out else pool
        calibrate = list(pool[:len(pool) - held_out].split(16)) if int8 else None
    done = export_edge(model, target, format, images=check, calibration=calibrate, extra=extra)
    outside = ", ".join(f"{op} x{n}" for op, n in done.outside.items()) or "none"
    console.print(f"wrote {target} and {target.with_suffix('.json')} ({done.size_bytes / 2**20:.1f} MiB{', int8' if int8 else ''})")
    if format == "coreml":
        console.print(f"read back with coremltools: an image classifier over {model.num_classes} classes, "
                      f"{sum(done.operations.values())} operations (Core ML runs only on Apple systems: not run here)")
        return
    runtime = {"executorch": "ExecuTorch", "litert": "LiteRT"}[format]
    console.print(f"{done.partitions} XNNPACK partition(s), operators outside: {outside}; {runtime} vs PyTorch on "
                  f"{done.images} {'held-out ' if calibrate else ''}images: top-1 agreement {done.agreement:.1%}, "
                  f"max difference {done.max_difference:.2e}")


def quantize_cmd(
    checkpoint: str = typer.Argument(..., help=SOURCE_HELP),
    calibration: Path = typer.Option(..., help="image folder: ImageNet layout (its train split) or any images"),
    images: int = typer.Option(256, min=1, help="calibration images (a seeded random subset)"),
    output: Optional[Path] = typer.Option(None, help="output file (default: MODEL_NAME_int8.onnx next to the model, "
                                          "else in the current folder)"),
    batch_size: int = typer.Option(32, min=1, help="calibration batch size"),
    pretrained: bool = PRETRAINED,
    pretrained_tag: Optional[str] = PRETRAINED_TAG,
) -> None:
    """Write a static int8 ONNX model (QDQ) calibrated on your images, checked against fp32."""
    import torch

    from ..api import load_source
    from ..fusion import fuse
    from ..inference.quantize import calibration_set, quantize_static

    _check_output(output, checkpoint)
    model, extra = load_source(checkpoint, pretrained, pretrained_tag)
    target = output or output_folder(checkpoint) / f"{model.model_name or 'model'}_int8.onnx"
    # two more batches, held out from calibration, to compare the int8 model with fp32
    data = calibration_set(calibration, model, images + 2 * batch_size, batch_size, crop_pct=extra.get("crop_pct"))
    held_out = 2 if len(data.batches) > 2 else 0
    calibrate = data.batches[:len(data.batches) - held_out]
    int8 = quantize_static(model, calibrate, target)
    skipped = f", {len(data.skipped)} unreadable skipped" if data.skipped else ""
    console.print(f"wrote {target} (static int8, QDQ; calibrated on {sum(len(b) for b in calibrate)} images{skipped})")
    x = torch.cat(data.batches[-held_out:] if held_out else calibrate)
    with torch.inference_mode():
        reference, got = fuse(model)(x), int8(x)
    difference = ((got - reference).abs().max() / reference.abs().max()).item()
    agreement = (got.argmax(1) == reference.argmax(1)).float().mean().item()
    console.print(f"int8 vs fp32 on {len(x)} {'held-out' if held_out else 'calibration'} images: top-1 agreement "
                  f"{agreement:.1%}, max relative difference {difference:.2e}")


def push_cmd(
    source: str = typer.Argument(..., help="training run folder, model folder, checkpoint.pt, or a model name with --pretrained"),
    repo: str = typer.Option(..., help="Hub repository ORG/NAME (created if needed)"),
    private: bool = typer.Option(False, help="create the repository private"),
    message: Optional[str] = typer.Option(None, help="commit message"),
    dry_run: Optional[Path] = typer.Option(None, "--dry-run", help="only write the folder that would be uploaded here"),
    pretrained: bool = PRETRAINED,
    pretrained_tag: Optional[str] = PRETRAINED_TAG,
) -> None:
    """Upload a model to the Hugging Face Hub with a model card (HF_TOKEN or `hf auth login`; HF_ENDPOINT for a mirror)."""
    from ..api import load_source
    from ..checks import check_output_folder
    from ..publish import check_repo_id, push_to_hub, save_for_hub

    check_repo_id(repo)  # before published weights download or anything is written
    if dry_run:
        check_output_folder(dry_run)
    if pretrained:  # republishing published weights (e.g. to a mirror): they carry their preprocessing
        model, extra = load_source(source, pretrained, pretrained_tag)
        target: object = model
    else:
        target, extra = source, {}
    if dry_run:
        folder = save_for_hub(target, dry_run, repo, extra)
        console.print(f"wrote {folder}: {', '.join(sorted(p.name for p in folder.iterdir()))}", highlight=False)
        return
    url = push_to_hub(target, repo, private=private, commit_message=message, extra=extra)
    console.print(f"pushed to {repo}: {url}\nload it with hybridvit.load_model(\"hf-hub:{repo}\")", highlight=False)
