"""growops: progressive training (Apollo) for any PyTorch model with a stack of blocks.

    a = growops.apollo(model, stages=(1, 3, 6, 12), stage_steps=(2000, 4000, 10000))
    opt = torch.optim.AdamW(a.parameters(), lr=3e-4)
    for batch in data:
        loss = a(**batch).loss
        loss.backward(); opt.step(); opt.zero_grad()
        a.step(opt)
    final = a.export()
"""

from .apollo import Apollo, apollo, plan
from .checkpoint import load_safetensors, save_safetensors
from .errors import GrowopsError, GrowopsTypeError
from .fx import BlockStack, find_block_stacks, insert_depth_gate, tie_blocks, trace_model
from .growth import expand_blocks
from .maps import depth_map, growth_sources
from .optim_state import remap_optimizer_state
from .plan import Plan
from .recipes import gstack, gstack_growth_tokens, stackbert
from .schedule import lvps_depth

__all__ = ["Apollo", "BlockStack", "GrowopsError", "GrowopsTypeError", "Plan", "apollo", "depth_map",
           "expand_blocks", "find_block_stacks", "growth_sources", "gstack", "gstack_growth_tokens",
           "insert_depth_gate", "load_safetensors", "lvps_depth", "plan", "remap_optimizer_state",
           "save_safetensors", "stackbert", "tie_blocks", "trace_model"]
