"""Custom ops for shared blocks (``torch.library``): a reference in plain torch, fake and autograd registrations,
and a CUDA kernel from ``growops_cuda/`` where it builds. See ``shared_linear`` for what they compute and why."""

from . import extension
from .routing import SharedLinear, route_shared_linears, unroute
from .shared_linear import linear_wgrad, shared_linear

__all__ = ["SharedLinear", "extension", "linear_wgrad", "route_shared_linears", "shared_linear", "unroute"]
