"""analog_stats: per-tile and total saturation, range use and read counts of a whole model."""
import pytest
import torch
import torch.nn as nn

from ffebm.analog import AnalogConfig, AnalogLinear, SoftBounds, analog_stats, convert_to_analog
from ffebm.analog.stats import reset_read_counts


def test_per_tile_and_total_statistics():
    torch.manual_seed(0)
    net = convert_to_analog(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Conv1d(1, 2, 2)),
                            AnalogConfig(device=SoftBounds()), seed=0)
    x = torch.rand(5, 4)
    y = net[0](x)
    y.sum().backward()
    st = analog_stats(net)
    assert [t.name for t in st.tiles] == ["0.weight", "2.weight"]
    a, b = st.tiles
    assert (a.forward_reads, a.backward_reads) == (5, 0)  # input gradient not asked: no backward read
    assert (b.forward_reads, b.backward_reads) == (0, 0) and a.shape == (3, 4) and b.shape == (2, 2)
    # saturate the first tile: every device at its upper bound
    with torch.no_grad():
        net[0].weight.fill_(10.0)
    st = analog_stats(net)
    assert st.tiles[0].at_bound == 1.0 and st.tiles[0].range_used == pytest.approx(1.0)
    tot = st.total
    assert tot.devices == 12 + 4
    assert tot.at_bound == pytest.approx((12 * 1.0 + 4 * st.tiles[1].at_bound) / 16)
    assert tot.forward_reads == 5
    sc = st.scalars()
    assert sc["analog/0.weight/at_bound"] == 1.0 and "analog/total/range_used" in sc
    assert "0.weight" in st.table() and "total" in st.table()
    reset_read_counts(net)
    assert analog_stats(net).total.forward_reads == 0


def test_input_gradient_counts_backward_reads():
    lin = AnalogLinear(4, 3)
    x = torch.rand(7, 4, requires_grad=True)
    lin(x).sum().backward()
    t = analog_stats(lin).tiles[0]
    assert (t.forward_reads, t.backward_reads) == (7, 7)
