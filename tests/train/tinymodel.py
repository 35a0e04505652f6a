"""A tiny plain nn.Module used by the trainer tests (no energy blocks): importable as
``model=tinymodel:build`` when tests/train is on PYTHONPATH (conftest.py arranges it)."""

import torch.nn as nn


def build(num_classes=10, in_channels=1, image_size=8, hidden=32, dropout=0.0, **_ignored):
    """``dropout`` > 0 adds a dropout layer (it draws on torch's global random stream)."""
    drop = [nn.Dropout(float(dropout))] if float(dropout) > 0 else []
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, hidden), nn.ReLU(),
                         *drop, nn.Linear(hidden, num_classes))


class _State:
    """Stands in for an analog device array: not a Module, but has state_dict/load_state_dict."""

    def __init__(self):
        import torch

        self.counter = torch.zeros(3)

    def state_dict(self):
        return {"counter": self.counter.clone()}

    def load_state_dict(self, d):
        self.counter = d["counter"].clone()


def build_with_state(**kw):
    m = build(**kw)
    m.device_state = _State()
    return m


class _Failing(nn.Module):
    """The tiny MLP, failing at its ``fail_at``-th training forward pass: ``kind`` = "nan" (NaN
    logits), "diverge" (raises ffebm.RelaxationDiverged for block "hop", relaxation step 7) or
    "gradnan" (finite output, NaN gradient of the first layer)."""

    def __init__(self, fail_at, kind, **kw):
        super().__init__()
        self.net = build(**kw)
        self.fail_at, self.kind, self.calls = fail_at, kind, 0

    def forward(self, x):
        if self.training:
            self.calls += 1
        y = self.net(x)
        if self.training and self.calls == self.fail_at:
            if self.kind == "nan":
                return y * float("nan")
            if self.kind == "diverge":
                import ffebm

                raise ffebm.RelaxationDiverged("hop", 7, "free")
            if self.kind == "gradnan":
                w = self.net[1].weight
                return y + _NanGrad.apply(w).sum() * 0
        return y


class _NanGrad:
    @staticmethod
    def apply(w):
        import torch

        class F(torch.autograd.Function):
            @staticmethod
            def forward(ctx, t):
                return t.clone()

            @staticmethod
            def backward(ctx, g):
                return torch.full_like(g, float("nan"))

        return F.apply(w)


def build_failing(fail_at=30, kind="nan", **kw):
    return _Failing(fail_at, kind, **kw)


def build_analog(**kw):
    """The tiny MLP with its layers on simulated analog tiles (for drift evaluation)."""
    from ffebm.analog import convert_to_analog

    return convert_to_analog(build(**kw), seed=0)


def build_ep_always(num_classes=10, in_channels=1, image_size=8, **_ignored):
    """A user builder with an energy block that always trains by EP(beta=0.5), whatever it is told."""
    import ffebm

    return nn.Sequential(nn.Flatten(), ffebm.DenseHopfield([in_channels * image_size * image_size, 16, 8],
                                                           gradient=ffebm.EP(beta=0.5)),
                         nn.Linear(8, num_classes))
