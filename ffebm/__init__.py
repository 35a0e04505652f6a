"""ffebm: feedforward-tied energy-based models with a hybrid backprop / EP gradient engine.

    import ffebm
    block = ffebm.DenseHopfield([64, 256, 128], gradient=ffebm.EP(beta=0.5))
    y = block(x)          # equilibrium of the block's top layer; loss.backward() works
    block.stats           # steps, residual, converged of the last free relaxation (a record only)
"""
import os as _os

# In a source checkout, models/ and train/ sit beside ffebm/; installed, they are the
# subpackages ffebm.models and ffebm.train (pyproject's package-dir). Either way they import as
# ffebm.models / ffebm.train, names that cannot collide with a user's own models.py or train.py.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "models")) and \
        _os.path.isfile(_os.path.join(_root, "models", "__init__.py")) and \
        _os.path.isfile(_os.path.join(_root, "train", "__init__.py")):
    __path__.append(_root)

from .blocks import ConvHopfield, DenseHopfield, EnergyBlock
from .compare import CURRENT, GDDComparison, GradientComparison, compare_gdd, compare_gradients
from .couplings import ConvCoupling, Coupling, DenseCoupling, SoftPool2d
from .errors import (AdjointNotConverged, ConvergenceWarning, FunctorchUnsupported, NotConverged, NotTwiceDifferentiable,
                     DifferenceFormUnsupported, RelaxationDiverged, UnsupportedGradient)
from .gradients import EP, BackwardStats, BlockCall, GradientMethod, GradientResult, Implicit, Unrolled
from .gradients.loss_nudge import loss_nudge
from .warm_start import WarmStarts, warm_start
from .solvers import STEPPERS, Relaxation, SolveStats, relax
from .utils import block_stats, energy_blocks, set_acceleration, set_gradient, set_precision

__version__ = "0.1.0"

__all__ = [
    "EnergyBlock", "DenseHopfield", "ConvHopfield",
    "Coupling", "DenseCoupling", "ConvCoupling", "SoftPool2d",
    "EP", "loss_nudge", "WarmStarts", "warm_start", "Implicit", "Unrolled", "GradientMethod", "BlockCall", "BackwardStats", "GradientResult",
    "Relaxation", "SolveStats", "relax", "STEPPERS",
    "RelaxationDiverged", "NotConverged", "ConvergenceWarning", "AdjointNotConverged",
    "NotTwiceDifferentiable", "FunctorchUnsupported", "UnsupportedGradient", "DifferenceFormUnsupported",
    "compare_gradients", "GradientComparison", "CURRENT", "compare_gdd", "GDDComparison",
    "energy_blocks", "set_gradient", "set_precision", "set_acceleration", "block_stats",
]
