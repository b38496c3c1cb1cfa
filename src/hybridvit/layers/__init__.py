"""Fusable building blocks shared by every model family."""

from .attention import AttentionMap, AttentionView, attention, attention_view, capture_attention, capture_maps, reference_attention
from .attention_bias import (BIAS_RESAMPLING, AttentionBias, FixedAttentionBias, bias_for_grid, bias_in_graph,
                             bias_index, resize_bias_table)
from .basic import DropPath, LayerNorm2d, QuickGELU, trunc_normal_
from .norm_act import BNLinear, ConvBN, LinearBN

__all__ = [
    "AttentionBias",
    "AttentionMap",
    "AttentionView",
    "BIAS_RESAMPLING",
    "BNLinear",
    "ConvBN",
    "DropPath",
    "FixedAttentionBias",
    "LayerNorm2d",
    "LinearBN",
    "QuickGELU",
    "attention",
    "attention_view",
    "bias_for_grid",
    "bias_in_graph",
    "bias_index",
    "capture_attention",
    "capture_maps",
    "reference_attention",
    "resize_bias_table",
    "trunc_normal_",
]
