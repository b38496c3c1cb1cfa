"""Hugging Face transformers folders: writing a model as one where its architecture maps, and
reading the class names and preprocessing of any (transformers' or timm's ``config.json``).

transformers' ``from_pretrained`` then reads the folder as it is, and hybridvit reads it back
through the same converters it uses for any Hugging Face folder. hybridvit's own details
(variant name, class names, preprocessing, training extras) ride along in ``config.json``
under ``"hybridvit"``, which transformers keeps as an attribute and otherwise ignores.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from ..data import imagenet_labels
from ..registry import architecture, to_hw
from .errors import CheckpointError
from .formats import CheckpointFormat, hf_image_size, registered_formats
from .io import Checkpoint

BICUBIC = 3  # PIL's code, as transformers' image processors store it


def foreign_extra(config: dict[str, Any], preprocessor: dict[str, Any]) -> dict[str, Any]:
    """Class names and preprocessing from a transformers ``config.json`` + image processor config,
    or a timm ``config.json`` (its ``pretrained_cfg``)."""
    extra: dict[str, Any] = {}
    labels = config.get("id2label") or {}
    names = [labels[k] for k in sorted(labels, key=int)] if labels else config.get("label_names")
    if names and not all(n == f"LABEL_{i}" for i, n in enumerate(names)):
        imagenet = imagenet_labels(len(names))
        extra["classes"] = imagenet[0] if imagenet else list(names)  # ImageNet: the synsets, as a val folder names them
        extra["class_names"] = list(names)
    timm_cfg = config.get("pretrained_cfg") or {}
    mean, std = preprocessor.get("image_mean") or timm_cfg.get("mean"), preprocessor.get("image_std") or timm_cfg.get("std")
    if mean and std:
        extra.update(mean=list(mean), std=list(std))
    size = hf_image_size(preprocessor)
    if isinstance(size, int):
        size = (size, size)
    if size is None and timm_cfg.get("input_size"):
        size = tuple(timm_cfg["input_size"][1:])
    if size:
        extra["input_size"] = list(size)
    crop_pct = _hf_crop_pct(preprocessor) if preprocessor else timm_cfg.get("crop_pct")
    if crop_pct:
        extra["crop_pct"] = float(crop_pct)
    return extra


def _hf_crop_pct(preprocessor: dict[str, Any]) -> float | None:
    """The centre-crop fraction of a transformers image processor (each family resizes its own way)."""
    kind = str(preprocessor.get("image_processor_type") or preprocessor.get("feature_extractor_type") or "")
    size, crop = preprocessor.get("size"), preprocessor.get("crop_size")
    short = size.get("shortest_edge") if isinstance(size, dict) else size
    if kind.startswith("Levit") and short and crop:  # resizes the short side to short * 256/224, then crops
        crop_h = crop.get("height") if isinstance(crop, dict) else crop
        return crop_h / int(short * 256 / 224)
    if kind.startswith("ConvNext") and short:  # CvT's processor: from 384 up it resizes without cropping
        return 1.0 if short >= 384 else preprocessor.get("crop_pct", 224 / 256)
    return preprocessor.get("crop_pct")


def _hf_format(model: nn.Module) -> CheckpointFormat | None:
    family = getattr(model, "family", None)
    return next((f for f in registered_formats() if f.family == family and f.to_folder is not None), None)


def preprocessor_config(model: nn.Module, extra: dict[str, Any]) -> dict[str, Any]:
    """The image processor config transformers uses for this family, with the model's preprocessing."""
    h, w = to_hw(extra.get("input_size") or model.input_hw)  # type: ignore[attr-defined]
    crop_pct = float(extra.get("crop_pct") or 224 / 256)
    common = {"do_resize": True, "resample": BICUBIC, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
              "image_mean": list(extra.get("mean") or (0.485, 0.456, 0.406)),
              "image_std": list(extra.get("std") or (0.229, 0.224, 0.225))}
    if model.family == "levit":  # type: ignore[attr-defined]
        # LevitImageProcessor resizes the short side to shortest_edge * 256/224, then crops.
        return {"image_processor_type": "LevitImageProcessor", **common,
                "size": {"shortest_edge": round(h / crop_pct * 224 / 256)}, "do_center_crop": True,
                "crop_size": {"height": h, "width": w}}
    # CvT uses ConvNext's processor: below 384 it resizes to h / crop_pct and crops, from 384 up it resizes only.
    return {"image_processor_type": "ConvNextImageProcessor", **common, "size": {"shortest_edge": h}, "crop_pct": crop_pct}


def transformers_layout(model: nn.Module, extra: dict[str, Any]) -> tuple[dict[str, Any], dict, dict[str, Any]] | None:
    """``(config.json, state dict, preprocessor_config.json)`` for transformers, or None when the
    architecture does not map (an ablation, a non-square input, a family transformers lacks).

    The mapping is checked by reading it back: the config hybridvit derives from the written
    folder must be the model's own.
    """
    fmt = _hf_format(model)
    if fmt is None or fmt.config_from_folder is None or fmt.to_folder is None:
        return None
    config, state = fmt.to_folder(model)
    preprocessor = preprocessor_config(model, extra)
    try:
        back = fmt.config_from_folder(Checkpoint(state, Path("."), config, preprocessor))
    except CheckpointError:  # a layout transformers' config cannot express
        return None
    ours = model.config  # type: ignore[attr-defined]
    same = (architecture(back) == architecture(ours) and to_hw(back.img_size) == to_hw(ours.img_size)
            and getattr(back, "mlp_act", None) == getattr(ours, "mlp_act", None))
    if not same:
        return None
    names = extra.get("class_names") or extra.get("classes")
    if names and len(names) == model.num_classes:  # type: ignore[attr-defined]
        config["id2label"] = {str(i): n for i, n in enumerate(names)}
        config["label2id"] = {n: i for i, n in enumerate(names)}
    else:
        config["num_labels"] = model.num_classes  # type: ignore[attr-defined]
    return config, state, preprocessor


def save_transformers_folder(model: nn.Module, path: str | Path, extra: dict[str, Any] | None = None) -> bool:
    """Write ``model`` to folder ``path`` in transformers' layout; False (nothing written) if it does not map."""
    extra = dict(extra or {})
    layout = transformers_layout(model, extra)
    if layout is None:
        return False
    config, state, preprocessor = layout
    config["hybridvit"] = {"model_name": getattr(model, "model_name", None), "extra": extra}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    return True
