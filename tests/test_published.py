"""The published configurations are built as published: parameter counts, state shapes, the
readout outside the energy, clamped / linear tops, the "goe" initialisation."""
import math

import pytest
import torch

import ffebm
import models
from models.published import ALIASES, DEVIATIONS, PARAMS, PUBLISHED, goe_init_


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_is_the_published_one(name):
    n = sum(p.numel() for p in models.build(name).parameters())
    want = DEVIATIONS[name][0] if name in DEVIATIONS else PARAMS[name]
    assert n == want, (name, n, want)
    if name not in DEVIATIONS:
        assert n == PARAMS[name]


def test_the_deviations_are_the_documented_ones():
    assert set(DEVIATIONS) == {"splitting_small_2block", "scaling_large"}
    # the 2-block deviation is exactly the extra pool of the published file: fc 512*2*2 vs 512*1*1 -> 256
    assert DEVIATIONS["splitting_small_2block"][0] - PARAMS["splitting_small_2block"] == (2048 - 512) * 256
    # 258 instead of 256 channels: conv 256->258 (no bias), batch norm, conv 258->256
    assert PARAMS["scaling_large"] - DEVIATIONS["scaling_large"][0] == 2 * 2 * 256 * 9 + 2 * 2


def test_small_3block_shapes_tops_and_readout():
    m = models.build("splitting_small_3block")
    blocks = [b for _, b in ffebm.energy_blocks(m)]
    assert [b.layer_shapes for b in blocks] == [[(128, 16, 16), (256, 8, 8)], [(256, 4, 4), (512, 2, 2)],
                                                [(512, 2, 2), (256,)]]
    assert [b.linear_top for b in blocks] == [False, False, True]          # clamp_last on blocks 1-2
    assert isinstance(m[-1], torch.nn.Linear) and m[-1].in_features == 256  # readout outside the energy
    assert [isinstance(b.input_map[-1], torch.nn.BatchNorm2d) for b in blocks] == [True, False, False]
    assert blocks[0].input_map[0].bias is None and blocks[1].input_map[0].bias is not None
    assert all(b.gain == 1.0 and b.relaxation.steps == 60 and b.nudge_relaxation.steps == 20 for b in blocks)
    assert all(b.gradient.beta == 0.2 for b in blocks)
    out = m(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_aliases_build_the_published_models():
    assert ALIASES["cifar10_l6_3blocks"] == "splitting_small_3block"
    a = sum(p.numel() for p in models.build("cifar10_l6_3blocks").parameters())
    assert a == PARAMS["splitting_small_3block"]
    with pytest.raises(ValueError, match="unknown option"):
        models.build("splitting_small_3block", channels=[1, 2])


def test_goe_init_is_symmetric_with_the_published_variances():
    g = torch.Generator().manual_seed(0)
    w = goe_init_(torch.empty(64, 64, 3, 3, dtype=torch.float64), 9e-4, g)
    assert torch.equal(w, w.transpose(-1, -2))
    off = w[..., 0, 1].flatten()
    diag = w[..., 0, 0].flatten()
    assert abs(off.var().item() / (9e-4 / 3) - 1) < 0.1 and abs(diag.var().item() / (2 * 9e-4 / 3) - 1) < 0.1
    sq = goe_init_(torch.empty(200, 200, dtype=torch.float64), 0.5, g)
    assert torch.equal(sq, sq.t()) and abs(sq[0, 1:].var().item() / (0.5 / 200) - 1) < 0.3
    m = models.build("splitting_small_3block")
    # 6 off-diagonal entries of variance V/3 and 3 diagonal ones of 2V/3 per 3x3 slice: mean variance 4V/9
    assert abs(m[0].couplings[0].weight.std().item() / math.sqrt(4 * 8.351e-5 / 9) - 1) < 0.02
