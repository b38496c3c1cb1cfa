"""Fusable building blocks shared by every model family."""

from .attention import attention, reference_attention
from .attention_bias import AttentionBias, FixedAttentionBias, bias_index, resize_bias_table
from .norm_act import BNLinear, ConvBN, LinearBN

__all__ = [
    "AttentionBias",
    "BNLinear",
    "ConvBN",
    "FixedAttentionBias",
    "LinearBN",
    "attention",
    "bias_index",
    "reference_attention",
    "resize_bias_table",
]
