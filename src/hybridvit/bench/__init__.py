"""Throughput benchmark with the LeViT paper's method, side by side with reference implementations.

The speed-accuracy figure of its results is ``hybridvit.figures.plot_speed_accuracy``.
"""

from .throughput import BenchResult, Candidate, DeviceOps, Plan, benchmark, machine_info

__all__ = ["BenchResult", "Candidate", "DeviceOps", "Plan", "benchmark", "machine_info"]
