"""CvT checkpoint layouts: the official release and Hugging Face, into hybridvit keys.

hybridvit keeps the official names inside a block (``attn.conv_proj_q.conv``, ``attn.proj_q``,
``mlp.fc1``, ...); only the stage containers differ (``stage{i}.`` / ``stages.{i}.``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from ..models.cvt import CvT, CvTConfig
from ..registry import find_variant, get_model_info
from .errors import CheckpointError
from .formats import CheckpointFormat, StateDict, hf_image_size, native_format, register_format, rename_keys
from .io import Checkpoint

_NUM_STAGES = 3


def convert_official(state: StateDict, model: nn.Module) -> StateDict:
    prefixes = []
    for i in range(_NUM_STAGES):
        prefixes += [(f"stage{i}.patch_embed.", f"stages.{i}.embed."), (f"stage{i}.blocks.", f"stages.{i}.blocks."),
                     (f"stage{i}.cls_token", f"stages.{i}.cls_token")]
    return rename_keys(state, prefixes)


# Inside one Hugging Face layer: (foreign, hybridvit).
_HF_LAYER = [("layernorm_before.", "norm1."), ("layernorm_after.", "norm2."),
             ("attention.output.dense.", "attn.proj."), ("intermediate.dense.", "mlp.fc1."), ("output.dense.", "mlp.fc2.")]
for _x in "qkv":
    _name = {"q": "query", "k": "key", "v": "value"}[_x]
    _conv = f"attention.attention.convolution_projection_{_name}.convolution_projection."
    _HF_LAYER += [(_conv + "convolution.", f"attn.conv_proj_{_x}.conv."), (_conv + "normalization.", f"attn.conv_proj_{_x}.bn."),
                  (f"attention.attention.projection_{_name}.", f"attn.proj_{_x}.")]


def _hf_prefixes(model: nn.Module) -> list[tuple[str, str]]:
    """(Hugging Face prefix, hybridvit prefix) for every layer of ``model``."""
    prefixes = [("layernorm.", "norm."), ("classifier.", "head.")]
    depth = model.config.depth  # type: ignore[attr-defined]
    for i in range(_NUM_STAGES):
        stage = f"cvt.encoder.stages.{i}."
        embed = stage + "embedding.convolution_embeddings."
        prefixes += [(embed + "projection.", f"stages.{i}.embed.proj."), (embed + "normalization.", f"stages.{i}.embed.norm."),
                     (stage + "cls_token", f"stages.{i}.cls_token")]
        for j in range(depth[i]):
            prefixes += [(f"{stage}layers.{j}.{old}", f"stages.{i}.blocks.{j}.{new}") for old, new in _HF_LAYER]
    return prefixes


def convert_hf(state: StateDict, model: nn.Module) -> StateDict:
    return rename_keys(state, _hf_prefixes(model))


def to_hf(model: nn.Module) -> tuple[dict[str, Any], StateDict]:
    """``model`` as a transformers ``CvtConfig`` dict and state dict (its input size goes in the image processor)."""
    c = model.config  # type: ignore[attr-defined]
    stages = len(c.depth)
    config = {
        "model_type": "cvt", "architectures": ["CvtForImageClassification"], "num_channels": c.in_chans,
        "patch_sizes": list(c.patch_size), "patch_stride": list(c.patch_stride), "patch_padding": list(c.patch_padding),
        "embed_dim": list(c.embed_dim), "num_heads": list(c.num_heads), "depth": list(c.depth),
        "mlp_ratio": [c.mlp_ratio] * stages, "attention_drop_rate": [0.0] * stages, "drop_rate": [0.0] * stages,
        "drop_path_rate": [0.0] * (stages - 1) + [c.drop_path_rate], "qkv_bias": [c.qkv_bias] * stages,
        "cls_token": [False] * (stages - 1) + [True], "qkv_projection_method": ["dw_bn"] * stages,
        "kernel_qkv": [c.kernel_qkv] * stages, "padding_kv": [c.kernel_qkv // 2] * stages, "stride_kv": [c.stride_kv] * stages,
        "padding_q": [c.kernel_qkv // 2] * stages, "stride_q": [c.stride_q] * stages,
    }
    state = rename_keys(model.state_dict(), [(ours, theirs) for theirs, ours in _hf_prefixes(model)])
    return config, state


def _single(cfg: dict[str, Any], key: str) -> Any:
    values = set(cfg[key])
    if len(values) != 1:
        raise CheckpointError(f"unsupported CvT config: {key} differs between stages ({cfg[key]})")
    return values.pop()


def config_from_hf(ckpt: Checkpoint) -> CvTConfig:
    """Map a Hugging Face ``CvtConfig`` to hybridvit's, refusing layouts CvT variants never use.

    The input size comes from the folder's ``preprocessor_config.json`` (CvT's config.json has
    none; e.g. ``microsoft/cvt-13-384`` differs from ``cvt-13`` only there), else the variant's.
    """
    cfg, state = ckpt.folder_config or {}, ckpt.state_dict
    if cfg.get("model_type") != "cvt":
        raise CheckpointError(f"not a CvT config.json (model_type={cfg.get('model_type')!r})")
    try:
        if list(cfg["cls_token"]) != [False, False, True] or _single(cfg, "qkv_projection_method") != "dw_bn":
            raise CheckpointError("unsupported CvT config: class token only in the last stage and dw_bn projections expected")
        kernel = _single(cfg, "kernel_qkv")
        if _single(cfg, "padding_q") != kernel // 2 or _single(cfg, "padding_kv") != kernel // 2:
            raise CheckpointError("unsupported CvT config: q/k/v padding must be kernel_qkv // 2")
        head = state.get("classifier.weight")
        config = CvTConfig(
            embed_dim=cfg["embed_dim"], num_heads=cfg["num_heads"], depth=cfg["depth"], patch_size=cfg["patch_sizes"],
            patch_stride=cfg["patch_stride"], patch_padding=cfg["patch_padding"], mlp_ratio=float(_single(cfg, "mlp_ratio")),
            kernel_qkv=kernel, stride_kv=_single(cfg, "stride_kv"), stride_q=_single(cfg, "stride_q"),
            qkv_bias=bool(_single(cfg, "qkv_bias")), mlp_act="gelu", drop_path_rate=float(cfg["drop_path_rate"][-1]),
            in_chans=cfg.get("num_channels", 3), num_classes=head.shape[0] if head is not None else 0,
        )
    except KeyError as e:
        raise CheckpointError(f"CvT config.json lacks {e}") from e
    variant = find_variant(CvT, config)
    img_size = hf_image_size(ckpt.preprocessor_config) or (get_model_info(variant).config.img_size if variant else None)
    return dataclasses.replace(config, img_size=img_size) if img_size else config


register_format(native_format("cvt", "stages.0.embed.proj.weight"))
register_format(CheckpointFormat("cvt-official", "cvt", "stage0.patch_embed.proj.weight", convert_official))
register_format(CheckpointFormat("cvt-huggingface", "cvt", "cvt.encoder.stages.0.embedding.convolution_embeddings.projection.weight",
                                 convert_hf, config_from_hf, to_hf))
