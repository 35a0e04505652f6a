"""Model-wide device statistics: one call for every tile of a model.

    stats = analog_stats(model)
    print(stats.table())                 # per tile and total
    writer.add_scalars(...) / stats.scalars()   # TensorBoard keys analog/<name>/<stat>

Per tile (see :meth:`AnalogTile.weight_stats <ffebm.analog.tile.AnalogTile.weight_stats>`):
``abs_mean`` (mean |w| in tile units), ``range_used`` (mean |w| / the device's bound on that
side), ``at_bound`` (fraction of devices within 2 % of their range from a bound: saturated),
and the read counts since the tile was built or :func:`reset_read_counts`: ``forward_reads`` /
``backward_reads`` (vectors read, i.e. crossbar operations, per direction). The total weights
each tile by its number of devices (means) or sums (counts).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Tuple

from torch import nn

from .tile import AnalogTile

__all__ = ["TileStats", "AnalogStats", "analog_stats", "reset_read_counts"]


@dataclass
class TileStats:
    """Statistics of one tile (or, for :attr:`AnalogStats.total`, of all of them)."""

    name: str
    shape: Tuple[int, int]
    arrays: int
    device: str
    devices: int
    abs_mean: float
    range_used: float
    at_bound: float
    forward_reads: int
    backward_reads: int


@dataclass
class AnalogStats:
    """Per-tile statistics of a model and their total (see the module docstring)."""

    tiles: List[TileStats] = field(default_factory=list)

    @property
    def total(self) -> TileStats:
        n = sum(t.devices for t in self.tiles) or 1

        def mean(k: str) -> float:
            return sum(getattr(t, k) * t.devices for t in self.tiles) / n

        kinds = sorted({t.device for t in self.tiles})
        return TileStats("total", (0, 0), sum(t.arrays for t in self.tiles), "+".join(kinds),
                         sum(t.devices for t in self.tiles), mean("abs_mean"), mean("range_used"),
                         mean("at_bound"), sum(t.forward_reads for t in self.tiles),
                         sum(t.backward_reads for t in self.tiles))

    def scalars(self, prefix: str = "analog") -> Dict[str, float]:
        """Flat ``{prefix/<tile>/<stat>: value}`` for TensorBoard (tile names as in the model),
        plus ``prefix/total/<stat>``."""
        out: Dict[str, float] = {}
        for t in self.tiles + [self.total]:
            for k in ("abs_mean", "range_used", "at_bound", "forward_reads", "backward_reads"):
                out[f"{prefix}/{t.name}/{k}"] = float(getattr(t, k))
        return out

    def as_dict(self) -> Dict[str, Any]:
        return {"tiles": [asdict(t) for t in self.tiles], "total": asdict(self.total)}

    def table(self) -> str:
        """A plain-text table, one line per tile and the total."""
        head = f"{'tile':<40} {'shape':>11} {'device':<14} {'|w|':>7} {'range':>7} {'at bound':>8} {'fwd reads':>10} {'bwd reads':>10}"
        lines = [head, "-" * len(head)]
        for t in self.tiles + [self.total]:
            shape = f"{t.shape[0]}x{t.shape[1]}" if t.shape != (0, 0) else ""
            lines.append(f"{t.name[-40:]:<40} {shape:>11} {t.device[:14]:<14} {t.abs_mean:7.3f} {t.range_used:7.1%} "
                         f"{t.at_bound:8.1%} {t.forward_reads:10d} {t.backward_reads:10d}")
        return "\n".join(lines)


def _named_tiles(model: nn.Module) -> List[Tuple[str, AnalogTile]]:
    """Every tile once, named after the analog weight that lives on it (``fc.weight``) or, for a
    tile no weight owns, after its module."""
    from .layers import _AnalogLayer

    seen, out = set(), []
    for name, m in model.named_modules():
        if isinstance(m, _AnalogLayer) and id(m.tile) not in seen:
            m._refresh()  # links the weight to its context; a write into it reaches the tile first
            seen.add(id(m.tile))
            out.append((f"{name}.weight" if name else "weight", m.tile))
    for name, m in model.named_modules():
        if isinstance(m, AnalogTile) and id(m) not in seen:
            seen.add(id(m))
            out.append((name or "tile", m))
    return out


def analog_stats(model: nn.Module) -> AnalogStats:
    """Per-tile and total device saturation, range use and read counts of every tile in ``model``."""
    tiles = []
    for name, tile in _named_tiles(model):
        st = tile.weight_stats()
        tiles.append(TileStats(name, (tile.out_size, tile.in_size), tile.n_arrays, type(tile.device_cfg).__name__,
                               tile.out_size * tile.in_size, st["abs_mean"], st["range_used"], st["at_bound"],
                               tile.n_forward_reads, tile.n_backward_reads))
    return AnalogStats(tiles)


def reset_read_counts(model: nn.Module) -> None:
    """Zero the read counters of every tile (and of analog energy couplings) in ``model``."""
    for _, tile in _named_tiles(model):
        tile.n_forward_reads = tile.n_backward_reads = 0
    for m in model.modules():
        if hasattr(m, "n_forward_reads") and not isinstance(m, AnalogTile):
            m.n_forward_reads = m.n_backward_reads = 0
