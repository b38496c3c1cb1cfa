"""Fusable building blocks shared by every model family."""

from .attention_bias import AttentionBias, FixedAttentionBias, bias_index, biased_attention, resize_bias_table
from .norm_act import BNLinear, ConvBN, LinearBN

__all__ = [
    "AttentionBias",
    "BNLinear",
    "ConvBN",
    "FixedAttentionBias",
    "LinearBN",
    "bias_index",
    "biased_attention",
    "resize_bias_table",
]
