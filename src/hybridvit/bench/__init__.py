"""Throughput benchmark with the LeViT paper's method, side by side with reference implementations."""

from .throughput import BenchResult, Candidate, benchmark, machine_info
from .plot import plot_speed_accuracy

__all__ = ["BenchResult", "Candidate", "benchmark", "machine_info", "plot_speed_accuracy"]
