"""FX analysis and passes: find the block stack in a graph, gate its depth, tie its blocks, find what switches a
residual block off (deepening) and which dimensions widen together (widening)."""

from .analysis import BlockStack, find_block_stacks
from .passes import insert_depth_gate, tie_blocks
from .residual import branch_zeros
from .trace import TracedModel, trace_model
from .width import width_groups, width_plan

__all__ = ["BlockStack", "TracedModel", "branch_zeros", "find_block_stacks", "insert_depth_gate", "tie_blocks",
           "trace_model", "width_groups", "width_plan"]
