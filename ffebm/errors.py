"""Errors and warnings raised by relaxations and gradient methods."""
from __future__ import annotations


class RelaxationDiverged(RuntimeError):
    """A relaxation produced NaN or inf.

    Attributes name the block, the phase ("free", "nudged+", "nudged-", ...) and the step at
    which the first non-finite state appeared, so a training loop can report it plainly.
    """

    def __init__(self, block: str, step: int, phase: str = "free", detail: str = "") -> None:
        self.block = block
        self.step = step
        self.phase = phase
        self.detail = detail
        msg = f"relaxation of block '{block}' diverged at step {step} ({phase} phase): non-finite state"
        if detail:
            msg += f"; {detail}"
        super().__init__(msg)

    def __reduce__(self):  # picklable (worker processes, torch.distributed) with its attributes
        return (type(self), (self.block, self.step, self.phase, self.detail))


class NonFiniteInput(ValueError):
    """An energy block was given an input holding NaN or inf (a relaxation would clip it to the
    box and hide it); ``block`` names the block."""

    def __init__(self, block: str) -> None:
        super().__init__(f"block '{block}': input holds NaN or inf")
        self.block = block


class NotConverged(RuntimeError):
    """A strict solve hit its step budget with a residual above its tolerance."""

    def __init__(self, block: str, phase: str, steps: int, residual: float, tol: float) -> None:
        self.block, self.phase, self.steps, self.residual, self.tol = block, phase, steps, residual, tol
        super().__init__(
            f"relaxation of block '{block}' ({phase} phase) did not converge in {steps} steps: "
            f"residual {residual:.3e} > tol {tol:.1e}"
        )

    def __reduce__(self):
        return (type(self), (self.block, self.phase, self.steps, self.residual, self.tol))


class ConvergenceWarning(UserWarning):
    """A solve hit its step budget with a residual above its tolerance (non-strict mode)."""


class AdjointNotConverged(RuntimeError):
    """The implicit-differentiation adjoint solve failed (no convergence or negative curvature)."""


class NotTwiceDifferentiable(RuntimeError):
    """A block's gradient was differentiated again (gradient penalty, ``create_graph=True``).

    EP, Implicit and Unrolled give first-order gradients only; rather than a silently wrong
    second-order value the double backward raises this error, naming the block.
    """


class FunctorchUnsupported(RuntimeError):
    """An energy block was called under a ``torch.func`` transform (grad, vmap, jacrev, ...)."""

    def __init__(self, block: str, transform: str = "torch.func") -> None:
        self.block, self.transform = block, transform
        super().__init__(
            f"energy block '{block}' cannot run under {transform}: its relaxation takes a data-dependent "
            "number of steps and its gradient methods call torch.autograd themselves. Call the model "
            "directly and use loss.backward() or torch.autograd.grad (per-sample gradients: call the "
            "block on one sample at a time)")

    def __reduce__(self):
        return (type(self), (self.block, self.transform))


class UnsupportedGradient(RuntimeError):
    """A gradient method was asked for a gradient it cannot compute on this block (e.g.
    backpropagation through analog tile reads); raised instead of returning a wrong value."""


class DifferenceFormUnsupported(ValueError):
    """``EP(form="difference")`` was asked of a block whose drive is not affine in its state
    (soft pooling, a max pool with live winners, an analog coupling, an activation other than
    the hard sigmoid / linear one); ``block`` names the block, ``reason`` says what is not."""

    def __init__(self, block: str, reason: str) -> None:
        self.block, self.reason = block, reason
        super().__init__(f"EP(form='difference') on block '{block}': {reason}; use EP(form='ordinary') there")

    def __reduce__(self):
        return (type(self), (self.block, self.reason))
