"""FX analysis and passes: find the block stack in a graph, gate its depth, tie its blocks."""

from .analysis import BlockStack, find_block_stacks
from .passes import insert_depth_gate, tie_blocks
from .trace import TracedModel, trace_model

__all__ = ["BlockStack", "TracedModel", "find_block_stacks", "insert_depth_gate", "tie_blocks", "trace_model"]
