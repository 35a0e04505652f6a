from .base import EnergyBlock
from .conv import ConvHopfield
from .dense import DenseHopfield

__all__ = ["EnergyBlock", "ConvHopfield", "DenseHopfield"]
