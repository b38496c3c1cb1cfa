"""On-device programs against ONNX Runtime on this CPU (XNNPACK standing in for an ARM core):
latency at batch 1, the model's input size, fused; each model and thread count in a process of
its own (ExecuTorch's thread pool is set before its program loads), 3 rounds of 100 calls after
10 warm-up calls, median reported.

    python scripts/benchmark_edge.py levit_128s levit_256 cvt_13 --threads 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def measure(name: str, threads: int) -> dict:
    import executorch.extension.pybindings.portable_lib as portable
    import torch

    portable._unsafe_reset_threadpool(threads)  # before the program loads: its delegate takes the pool then
    torch.set_num_threads(threads)
    from executorch.runtime import Runtime

    import hybridvit
    from hybridvit.fusion import fuse
    from hybridvit.inference.deploy import for_device
    from hybridvit.inference.edge import executorch_program
    from hybridvit.inference.export import onnx_bytes, onnxruntime_session

    fused = fuse(hybridvit.create_model(name).eval())
    x = torch.randn(1, 3, *fused.input_hw)
    program, partitions, outside = executorch_program(for_device(fused), x)
    method = Runtime.get().load_program(program).load_method("forward")
    session = onnxruntime_session(onnx_bytes(fused, x), threads)
    runs = {"executorch": lambda: method.execute([x]), "onnxruntime": lambda: session.run(None, {"images": x.numpy()})}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(3):
        for label, call in runs.items():
            for _ in range(10):
                call()
            start = time.perf_counter()
            for _ in range(100):
                call()
            times[label].append((time.perf_counter() - start) * 10)  # ms per call
    ms = {k: statistics.median(v) for k, v in times.items()}
    return {"model": name, "threads": threads, "partitions": partitions, "outside": outside,
            "executorch_ms": ms["executorch"], "onnxruntime_ms": ms["onnxruntime"],
            "ratio": ms["executorch"] / ms["onnxruntime"], "size_mib": len(program) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # a single measurement, in this process
    args = parser.parse_args()
    rows = []
    for name in args.models:
        for threads in args.threads:
            done = subprocess.run([sys.executable, __file__, name, "--one", name, str(threads)], capture_output=True,
                                  text=True, check=True) if args.one is None else None
            row = measure(*args.one[:1], int(args.one[1])) if done is None else json.loads(done.stdout.splitlines()[-1])
            if args.one is not None:
                print(json.dumps(row))
                return
            rows.append(row)
            print(f"{name:12s} {threads} thread(s): ExecuTorch {row['executorch_ms']:.2f} ms, ONNX Runtime "
                  f"{row['onnxruntime_ms']:.2f} ms ({row['ratio']:.2f}x), {row['partitions']} partition(s), "
                  f"{sum(row['outside'].values())} op(s) outside XNNPACK, {row['size_mib']:.1f} MiB", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
