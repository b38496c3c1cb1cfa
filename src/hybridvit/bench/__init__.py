"""Throughput benchmark with the LeViT paper's method, side by side with reference implementations."""

from .plot import plot_speed_accuracy
from .throughput import BenchResult, Candidate, DeviceOps, Plan, benchmark, machine_info

__all__ = ["BenchResult", "Candidate", "DeviceOps", "Plan", "benchmark", "machine_info", "plot_speed_accuracy"]
