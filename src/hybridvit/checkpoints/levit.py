"""LeViT checkpoint layouts: the official release, timm and Hugging Face, into hybridvit keys.

The official release and Hugging Face keep the layers as one flat sequence (attention, MLP,
attention, MLP, ..., shrink attention, MLP, ...): the official code numbers it across the
whole network (``blocks.{i}``), Hugging Face per stage with the shrink at the end of the
stage before (``encoder.stages.{s}.layers.{j}``). hybridvit groups them as
``stages.{s}.downsample`` / ``stages.{s}.blocks.{j}``, like timm.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..models.levit import LeViTConfig
from ..registry import get_model_info, to_hw
from .errors import CheckpointError
from .io import Checkpoint
from .formats import CheckpointFormat, StateDict, native_format, register_format, remap_bias_tables, rename_keys


def layer_sequence(depth: tuple[int, ...]) -> list[tuple[int, str, str]]:
    """``(stage, hybridvit prefix, kind)`` of every layer in the official flat order."""
    seq = []
    for s, d in enumerate(depth):
        for j in range(d):
            seq += [(s, f"stages.{s}.blocks.{j}.attn", "attn"), (s, f"stages.{s}.blocks.{j}.mlp", "mlp")]
        if s + 1 < len(depth):
            seq += [(s, f"stages.{s + 1}.downsample.attn", "shrink"), (s, f"stages.{s + 1}.downsample.mlp", "mlp")]
    return seq


# Sub-module names inside each kind of layer: (foreign, hybridvit).
_OFFICIAL_LEAVES = {
    "attn": [("m.qkv.c.", "qkv.linear."), ("m.qkv.bn.", "qkv.bn."), ("m.proj.1.c.", "proj.linear."),
             ("m.proj.1.bn.", "proj.bn."), ("m.attention_biases", "attention_bias.table"),
             ("m.attention_bias_idxs", "attention_bias.index")],
    "shrink": [("kv.c.", "kv.linear."), ("kv.bn.", "kv.bn."), ("q.1.c.", "q.linear."), ("q.1.bn.", "q.bn."),
               ("proj.1.c.", "proj.linear."), ("proj.1.bn.", "proj.bn."), ("attention_biases", "attention_bias.table"),
               ("attention_bias_idxs", "attention_bias.index")],
    "mlp": [("m.0.c.", "up.linear."), ("m.0.bn.", "up.bn."), ("m.2.c.", "down.linear."), ("m.2.bn.", "down.bn.")],
}
_HF_LEAVES = {
    "attn": [("module.queries_keys_values.linear.", "qkv.linear."), ("module.queries_keys_values.batch_norm.", "qkv.bn."),
             ("module.projection.linear.", "proj.linear."), ("module.projection.batch_norm.", "proj.bn."),
             ("module.attention_biases", "attention_bias.table"), ("module.attention_bias_idxs", "attention_bias.index")],
    "shrink": [("keys_values.linear.", "kv.linear."), ("keys_values.batch_norm.", "kv.bn."),
               ("queries.linear.", "q.linear."), ("queries.batch_norm.", "q.bn."),
               ("projection.linear.", "proj.linear."), ("projection.batch_norm.", "proj.bn."),
               ("attention_biases", "attention_bias.table"), ("attention_bias_idxs", "attention_bias.index")],
    "mlp": [("module.linear_up.linear.", "up.linear."), ("module.linear_up.batch_norm.", "up.bn."),
            ("module.linear_down.linear.", "down.linear."), ("module.linear_down.batch_norm.", "down.bn.")],
}


def _depth(model: nn.Module) -> tuple[int, ...]:
    return tuple(model.config.depth)  # type: ignore[attr-defined]


def convert_official(state: StateDict, model: nn.Module) -> StateDict:
    prefixes = [(f"patch_embed.{2 * i}.c.", f"stem.conv{i + 1}.conv.") for i in range(4)]
    prefixes += [(f"patch_embed.{2 * i}.bn.", f"stem.conv{i + 1}.bn.") for i in range(4)]
    prefixes += [("head.l.", "head.linear."), ("head_dist.l.", "head_dist.linear.")]
    for i, (_, ours, kind) in enumerate(layer_sequence(_depth(model))):
        prefixes += [(f"blocks.{i}.{old}", f"{ours}.{new}") for old, new in _OFFICIAL_LEAVES[kind]]
    return remap_bias_tables(rename_keys(state, prefixes), model)


def _hf_prefixes(model: nn.Module) -> list[tuple[str, str]]:
    """(Hugging Face prefix, hybridvit prefix) for every layer of ``model``."""
    prefixes = []
    for i in range(4):
        old = f"levit.patch_embeddings.embedding_layer_{i + 1}."
        prefixes += [(old + "convolution.", f"stem.conv{i + 1}.conv."), (old + "batch_norm.", f"stem.conv{i + 1}.bn.")]
    for old, new in (("classifier.", "head."), ("classifier_distill.", "head_dist.")):
        prefixes += [(old + "batch_norm.", new + "bn."), (old + "linear.", new + "linear.")]
    position: dict[int, int] = {}
    for stage, ours, kind in layer_sequence(_depth(model)):
        j = position[stage] = position.get(stage, -1) + 1
        prefixes += [(f"levit.encoder.stages.{stage}.layers.{j}.{old}", f"{ours}.{new}") for old, new in _HF_LEAVES[kind]]
    return prefixes


def convert_hf(state: StateDict, model: nn.Module) -> StateDict:
    return remap_bias_tables(rename_keys(state, _hf_prefixes(model)), model)  # older exports saved the index buffers


def to_hf(model: nn.Module) -> tuple[dict[str, Any], StateDict]:
    """``model`` as a transformers ``LevitConfig`` dict and state dict (the bias tables share the official order)."""
    c = model.config  # type: ignore[attr-defined]
    h, w = to_hw(c.img_size)

    def whole(x: float) -> float | int:  # transformers' LevitConfig types the ratios as ints
        return int(x) if float(x).is_integer() else x

    config = {
        "model_type": "levit",
        "architectures": ["LevitForImageClassificationWithTeacher" if c.distillation else "LevitForImageClassification"],
        "image_size": h if h == w else [h, w], "num_channels": c.in_chans, "kernel_size": 3, "stride": 2, "padding": 1,
        "patch_size": 16, "hidden_sizes": list(c.embed_dim), "num_attention_heads": list(c.num_heads),
        "depths": list(c.depth), "key_dim": [c.key_dim] * len(c.depth),
        "drop_path_rate": 0,  # typed int by transformers; LeViT-384's 0.1 only matters for training
        "mlp_ratio": [whole(c.mlp_ratio)] * len(c.depth), "attention_ratio": [whole(c.attn_ratio)] * len(c.depth),
        "down_ops": [["Subsample", c.key_dim, dim // c.key_dim, whole(c.shrink_attn_ratio), whole(c.shrink_mlp_ratio), 2]
                     for dim in c.embed_dim[:-1]],
    }
    state = rename_keys(model.state_dict(), [(ours, theirs) for theirs, ours in _hf_prefixes(model)])
    return config, state


# timm calls every conv/linear of a ConvNorm/LinearNorm "linear"; the stem's are convolutions here.
# Older timm versions also saved the bias index buffers.
_TIMM_PARTS = [(".attention_biases", ".attention_bias.table"), (".attention_bias_idxs", ".attention_bias.index"), (".attn_downsample.", ".attn."),
               (".q.ln.", ".q."), (".proj.ln.", ".proj."), (".mlp.ln1.", ".mlp.up."), (".mlp.ln2.", ".mlp.down.")]


def convert_timm(state: StateDict, model: nn.Module) -> StateDict:
    out = {}
    for key, value in state.items():
        if key.startswith("stem."):
            key = key.replace(".linear.", ".conv.")
        for old, new in _TIMM_PARTS:
            key = key.replace(old, new)
        out[key] = value
    return remap_bias_tables(out, model)


def config_from_hf(ckpt: Checkpoint) -> LeViTConfig:
    """Map a Hugging Face ``LevitConfig`` to hybridvit's, refusing what LeViT variants never use."""
    cfg, state = ckpt.folder_config or {}, ckpt.state_dict
    if cfg.get("model_type") != "levit":
        raise CheckpointError(f"not a LeViT config.json (model_type={cfg.get('model_type')!r})")
    try:
        key_dims, attn_ratios, mlp_ratios = set(cfg["key_dim"]), set(cfg["attention_ratio"]), set(cfg["mlp_ratio"])
        if len(key_dims) != 1 or len(attn_ratios) != 1 or len(mlp_ratios) != 1 or cfg.get("patch_size", 16) != 16:
            raise CheckpointError("unsupported LeViT config: per-stage key_dim/ratios must be equal and patch_size 16")
        head = state.get("classifier.linear.weight")  # the weights, not the labels, decide the head
        num_classes = head.shape[0] if head is not None else 0
        shrink = cfg.get("down_ops") or [["Subsample", None, None, 4, 2, 2]]
        return LeViTConfig(
            embed_dim=tuple(cfg["hidden_sizes"]), num_heads=tuple(cfg["num_attention_heads"]), depth=tuple(cfg["depths"]),
            key_dim=key_dims.pop(), attn_ratio=float(attn_ratios.pop()), mlp_ratio=float(mlp_ratios.pop()),
            shrink_attn_ratio=float(shrink[0][3]), shrink_mlp_ratio=float(shrink[0][4]),
            drop_path_rate=float(cfg.get("drop_path_rate", 0.0)), img_size=cfg.get("image_size", 224),
            in_chans=cfg.get("num_channels", 3), num_classes=num_classes,
            distillation="classifier_distill.linear.weight" in state,
        )
    except KeyError as e:
        raise CheckpointError(f"LeViT config.json lacks {e}") from e


def config_from_timm(ckpt: Checkpoint) -> LeViTConfig:
    """The variant a timm ``config.json`` names (``architecture``), with the weights' head and input size."""
    cfg, state = ckpt.folder_config or {}, ckpt.state_dict
    name = cfg.get("architecture")
    try:
        info = get_model_info(str(name))
    except ValueError:
        raise CheckpointError(f"timm architecture {name!r} is not a hybridvit LeViT variant "
                              f"(the levit_conv_* models keep 1x1 convolutions and do not load here)") from None
    input_size = (cfg.get("pretrained_cfg") or {}).get("input_size") or [3, *info.input_size[1:]]
    head = state.get("head.linear.weight")
    return info.build_config(num_classes=head.shape[0] if head is not None else 0, img_size=tuple(input_size[1:]),
                             distillation="head_dist.linear.weight" in state)


register_format(native_format("levit", "stem.conv1.conv.weight"))
register_format(CheckpointFormat("levit-official", "levit", "patch_embed.0.c.weight", convert_official))
register_format(CheckpointFormat("levit-timm", "levit", "stem.conv1.linear.weight", convert_timm, config_from_timm))
register_format(CheckpointFormat("levit-huggingface", "levit", "levit.patch_embeddings.embedding_layer_1.convolution.weight",
                                 convert_hf, config_from_hf, to_hf))
