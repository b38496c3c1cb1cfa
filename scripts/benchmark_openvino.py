"""Each lever on OpenVINO's own ground, measured in one process against OpenVINO on the official model.

LeViT-128S (or another LeViT) at batch 16, 224x224, random weights (speed does not depend on
them), interleaved rounds, median images/s and the median of per-round ratios against the peer:

- peers: the official BN-fused model's ONNX export in OpenVINO at its default precision (bf16
  where the CPU has it) and with the f32 hint; NNCF's default int8 of the same export; and the
  default-precision peer compiled at the fixed batch too (what a user who reshapes gets);
- ours as ``optimize`` builds it now (ONNX export, the batch compiled with fixed shapes, the
  stem's tokens channels-last), and with one lever changed at a time: a free batch size; the
  earlier token layout (flatten, then transpose); conversion straight from PyTorch
  (``openvino.convert_model``); attention as ``scaled_dot_product_attention`` with the bias as an
  additive mask (OpenVINO's SDPA op); int8 with NNCF's transformer preset (SmoothQuant), with the
  stem's first convolution left in float, and from the PyTorch conversion.

    python scripts/benchmark_openvino.py --official ~/LeViT --threads 1 --json docs/bench_openvino_1t.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

BATCH = 16


@contextmanager
def patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


def sdpa(q, k, v, bias=None, scale=None, **_):
    """Attention as one SDPA call, q/k narrower than v, the bias an additive mask (OpenVINO's SDPA op)."""
    scale = float(q.shape[-1]) ** -0.5 if scale is None else scale
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


def flatten_then_transpose(self, x):
    """The stem's token layout before issue 35: planar map flattened, then transposed."""
    x = self.stem(x)
    grid = (x.shape[-2], x.shape[-1])
    return x.flatten(2).transpose(1, 2).contiguous(), grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", type=Path, required=True, help="a clone of facebookresearch/LeViT")
    parser.add_argument("--model", default="levit_128s")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.5, help="timed seconds per row and round")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import nncf
    import openvino as ov

    import hybridvit
    import hybridvit.models.levit as levit
    from hybridvit.bench.candidates import Calibration, _official_levit
    from hybridvit.bench.throughput import machine_info
    from hybridvit.fusion import fuse
    from hybridvit.inference import quantize
    from hybridvit.inference.export import onnx_bytes
    from hybridvit.inference.machine import matmul_rates
    from hybridvit.inference.runners import OnnxRuntimeRunner, OpenVinoRunner
    from hybridvit.layers.attention import reference_attention

    x = torch.randn(BATCH, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    images = Calibration().of(args.model)()
    official = _official_levit(args.official, args.model)().eval().requires_grad_(False)
    ours = fuse(hybridvit.create_model(args.model).eval()).requires_grad_(False)

    def export(model: torch.nn.Module) -> bytes:
        return onnx_bytes(model, x[:2])

    def converted(model: torch.nn.Module) -> Any:
        # the export form of attention (the in-place softmax of the fast eager path does not convert)
        with torch.no_grad(), reference_attention():
            model(x[:1])
            return ov.convert_model(model, example_input=x, input=[(-1, 3, 224, 224)])

    def nncf_int8(source: Any, **options: Any) -> Any:
        return quantize.nncf_openvino(source, images, **options)

    with patched(levit.LeViT, "_stem", flatten_then_transpose):
        old_layout = export(fuse(hybridvit.create_model(args.model).eval()).requires_grad_(False))
    with patched(levit, "attention", sdpa):
        sdpa_model = converted(ours)
    builds: dict[str, Callable[[], Any]] = {
        "peer: official, OpenVINO default precision": lambda: OpenVinoRunner(export(official), precision="default"),
        "peer: official, OpenVINO f32": lambda: OpenVinoRunner(export(official)),
        "peer: official, OpenVINO default precision, fixed batch": lambda: OpenVinoRunner(
            export(official), x, precision="default"),
        "peer: official, NNCF int8": lambda: OpenVinoRunner(nncf_int8(export(official))),
        "ours bf16 (ONNX, fixed batch)": lambda: OpenVinoRunner(export(ours), x, "bf16"),
        "ours bf16, free batch": lambda: OpenVinoRunner(export(ours), precision="bf16"),
        "ours bf16, earlier token layout": lambda: OpenVinoRunner(old_layout, x, "bf16"),
        "ours bf16, convert_model from PyTorch": lambda: OpenVinoRunner(converted(ours), x, "bf16"),
        "ours bf16, SDPA with bias mask": lambda: OpenVinoRunner(sdpa_model, x, "bf16"),
        "ours f32 (ONNX, fixed batch)": lambda: OpenVinoRunner(export(ours), x, "fp32"),
        "ours f32, free batch": lambda: OpenVinoRunner(export(ours)),
        "ours f32 in ONNX Runtime": lambda: OnnxRuntimeRunner(export(ours)),
        "ours int8 (NNCF default, fixed batch)": lambda: OpenVinoRunner(nncf_int8(export(ours)), static_batch=BATCH),
        "ours int8, NNCF transformer preset": lambda: OpenVinoRunner(
            nncf_int8(export(ours), model_type=nncf.ModelType.TRANSFORMER), static_batch=BATCH),
        "ours int8, stem's first convolution in float": lambda: OpenVinoRunner(
            nncf_int8(export(ours), ignored_scope=nncf.IgnoredScope(patterns=[".*stem/conv1/.*"], validate=False)),
            static_batch=BATCH),
        "ours int8, from convert_model": lambda: OpenVinoRunner(nncf_int8(converted(ours)), static_batch=BATCH),
    }
    runners = {name: build() for name, build in builds.items()}
    for run in runners.values():  # warm-up
        for _ in range(3):
            run(x)
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, run in runners.items():
            start, count = time.perf_counter(), 0
            while count == 0 or time.perf_counter() - start < args.seconds:
                run(x)
                count += 1
            rates[name].append(BATCH * count / (time.perf_counter() - start))

    def ratio(a: str, b: str) -> float:
        return statistics.median(p / q for p, q in zip(rates[a], rates[b]))

    peers = {"default": "peer: official, OpenVINO default precision", "f32": "peer: official, OpenVINO f32",
             "int8": "peer: official, NNCF int8"}
    rows = []
    for name, r in rates.items():
        peer = peers["int8" if "int8" in name else "f32" if "f32" in name else "default"]  # fixed-batch peer: vs free
        rows.append({"row": name, "images_per_s": statistics.median(r), "rounds": r,
                     "vs_peer": None if name == peer else ratio(name, peer), "peer": peer})
    result = {"machine": machine_info(torch.device("cpu"), args.threads), "matmul_gflops": matmul_rates(),
              "model": args.model, "batch": BATCH, "rows": rows,
              "int8_over_bf16": ratio("ours int8 (NNCF default, fixed batch)", "ours bf16 (ONNX, fixed batch)")}
    for row in rows:
        vs = f"{row['vs_peer']:.3f}x {row['peer']}" if row["vs_peer"] else ""
        print(f"{row['row']:48s} {row['images_per_s']:8.1f}  {vs}")
    print(f"int8 / bf16 (ours): {result['int8_over_bf16']:.3f}x")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
