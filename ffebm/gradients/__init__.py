"""Gradient methods for energy blocks (objects passed as ``block.gradient``)."""
from .base import BackwardStats, BlockCall, GradientMethod, GradientResult, primitive_difference_grads
from .ep import EP
from .implicit import Implicit
from .unrolled import Unrolled
from .registry import method_from_name, method_names, register_method

__all__ = ["method_from_name", "method_names", "register_method", "GradientMethod", "BlockCall", "BackwardStats", "GradientResult", "EP", "Implicit", "Unrolled", "primitive_difference_grads"]
