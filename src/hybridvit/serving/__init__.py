"""What runs the engine (``hybridvit.inference``) for users: predictions over image collections
(``predict``, ``pipeline``, ``collection``; Ray Data in ``ray_data``) and the server (``server``:
this server's API, ``v2``/``grpc_v2``: the Open Inference Protocol, ``repository``: several
models and versions, ``batcher``, ``tracing``; Ray Serve in ``ray_serve``).

Names are imported on first use, as in the top-level package.
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

__all__ = ["InferenceSpec", "Prediction", "PredictionRun", "Predictor", "predict_collection"]

__getattr__, __dir__ = lazy_exports(__name__, {
    "InferenceSpec": "predict", "Prediction": "predict", "PredictionRun": "predict", "Predictor": "predict",
    "predict_collection": "collection"})

if TYPE_CHECKING:
    from .collection import predict_collection
    from .predict import InferenceSpec, Prediction, PredictionRun, Predictor
