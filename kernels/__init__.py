"""Compute kernels for LT2 hybrids: gated DeltaNet, DeepSeek sparse attention, sliding-window attention.

Every fast kernel sits beside a naive ``*_reference`` with the same signature. Only torch is required;
fla/triton are used, when installed, for the CUDA gated-delta-rule prefill.
"""

from .dsa import dsa, dsa_reference, dsa_step, index_scores
from .gdn import gated_delta_rule, gated_delta_rule_reference, gated_delta_rule_step
from .swa import sliding_window_attention, sliding_window_attention_reference, sliding_window_attention_step

__all__ = [
    "dsa",
    "dsa_reference",
    "dsa_step",
    "gated_delta_rule",
    "gated_delta_rule_reference",
    "gated_delta_rule_step",
    "index_scores",
    "sliding_window_attention",
    "sliding_window_attention_reference",
    "sliding_window_attention_step",
]
