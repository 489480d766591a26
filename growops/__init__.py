"""growops: progressive training (Apollo) for any PyTorch model with a stack of blocks.

    a = growops.apollo(model, stages=(1, 3, 6, 12), stage_steps=(2000, 4000, 10000))
    opt = torch.optim.AdamW(a.parameters(), lr=3e-4)
    for batch in data:
        loss = a(**batch).loss
        loss.backward(); opt.step(); opt.zero_grad()
        a.step(opt)
    final = a.export()

    a.save_pretrained("ckpt")                          # the model a.eval() computes + growops_config.json
    a = growops.from_pretrained(fresh_model, "ckpt")  # the wrapper again, where it stood
    ema = growops.AveragedExport(a)                    # weight averages of a.export(); ema.update_parameters(a)

    deep = growops.deepen(model, layers=24)   # one function-preserving depth growth (zero-initialised blocks)
    wide = growops.widen(model, hidden=1024)  # one function-preserving width growth (Net2Net, from the graph)
"""

import logging

__version__ = "0.2.0"

from .apollo import Apollo, apollo, plan
from .averaging import AveragedExport
from .checkpoint import from_pretrained, load_safetensors, save_safetensors
from .config import ApolloConfig
from .deepening import deepen
from .errors import GrowopsError, GrowopsTypeError
from .fx import BlockStack, find_block_stacks, insert_depth_gate, tie_blocks, trace_model
from .fx.trace import register_inputs_provider
from .growth import expand_blocks
from .integrations.hf_inputs import candidate_inputs
from .maps import depth_map, growth_sources
from .optim_state import remap_optimizer_state
from .plan import Plan
from .recipes import gstack, gstack_growth_tokens, stackbert
from .schedule import lvps_depth
from .widening import widen, widen_optimizer_state

__all__ = ["Apollo", "ApolloConfig", "AveragedExport", "BlockStack", "GrowopsError", "GrowopsTypeError", "Plan",
           "apollo", "deepen", "depth_map", "expand_blocks", "find_block_stacks", "from_pretrained", "growth_sources",
           "gstack", "gstack_growth_tokens", "insert_depth_gate", "load_safetensors", "lvps_depth", "plan",
           "remap_optimizer_state", "save_safetensors", "stackbert", "tie_blocks", "trace_model", "widen",
           "widen_optimizer_state"]

# Hugging Face models are traced on inputs built from their configs (the tracer asks its providers; importing this
# module does not import transformers).
register_inputs_provider(candidate_inputs)

# Growth events (INFO) and the schedule per step (DEBUG) go to the "growops" logger; the application configures
# handlers (logging.basicConfig(level=logging.INFO), say): a library adds only a NullHandler.
logging.getLogger("growops").addHandler(logging.NullHandler())
