"""Gradient methods for energy blocks (objects passed as ``block.gradient``)."""
from .base import BackwardStats, BlockCall, GradientMethod, GradientResult, primitive_difference_grads
from .ep import EP
from .implicit import Implicit
from .unrolled import Unrolled

__all__ = ["GradientMethod", "BlockCall", "BackwardStats", "GradientResult", "EP", "Implicit", "Unrolled", "primitive_difference_grads"]
