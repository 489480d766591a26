"""PEFT: an adapter-only checkpoint goes with the base model it was trained on.

Under growops the base model's blocks are shared and grown too (frozen or not), so the base an adapter trains with is
not the pretrained one the adapter checkpoint will be loaded onto: ``PeftModel.save_pretrained`` (adapter weights
only) of a wrapped model would describe another model than ``a.eval()``. It is refused; the whole model saves.
"""

from __future__ import annotations

import sys

from ..state import running_frame


def adapter_only_save() -> bool:
    """Whether PEFT's ``get_peft_model_state_dict`` (what ``PeftModel.save_pretrained`` saves: the adapter's weights
    only) is running now (read from the stack; False when PEFT was never imported)."""
    module = sys.modules.get("peft.utils.save_and_load")
    function = getattr(module, "get_peft_model_state_dict", None)
    code = getattr(function, "__code__", None)
    return code is not None and running_frame(code) is not None
