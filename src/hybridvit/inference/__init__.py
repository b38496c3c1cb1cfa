"""Running trained models: the fastest path on this machine (``optimize``), the runtimes behind it
(``runners``), static int8 (``quantize``), files for other runtimes (``export``), the machine's
own matrix-multiply bound (``machine``) and predictions over image collections (``predict``).

Names are imported on first use, as in the top-level package.
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

__all__ = ["Backend", "InferenceModel", "InferenceSpec", "Precision", "export", "matmul_rates", "optimize",
           "quantize_static", "tune_cpu_allocator"]

__getattr__, __dir__ = lazy_exports(__name__, {
    "Backend": "spec", "InferenceModel": "optimize", "InferenceSpec": "spec", "Precision": "spec", "export": "export",
    "matmul_rates": "machine", "optimize": "optimize", "quantize_static": "quantize",
    "tune_cpu_allocator": "optimize"})

if TYPE_CHECKING:
    from .export import export
    from .machine import matmul_rates
    from .optimize import InferenceModel, optimize, tune_cpu_allocator
    from .spec import Backend, InferenceSpec, Precision
    from .quantize import quantize_static
