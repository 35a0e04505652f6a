"""Worker for test_train_analog: launched by torchrun with 2 CPU processes (gloo). Each process
records different pulsed-update pairs on an identical analog layer, gathers them, takes one
AnalogOptimizer step and saves what it saw to OUT/rank<r>.pt."""
import sys

import torch
import torch.distributed as dist

from ffebm.analog import AnalogConfig, AnalogLinear, AnalogOptimizer, AnalogSGD, ConstantStep
from ffebm.analog.distributed import gather_pairs

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
layer = AnalogLinear(5, 4, config=AnalogConfig(device=ConstantStep()), seed=0)   # same seeds: same tile
torch.manual_seed(100 + rank)                                                      # different data
n = 3 + rank                                                                       # and batch sizes
x = torch.rand(n, 5)
layer(x).square().sum().backward()
x_local, d_local = layer.weight.analog_ctx.pending()
gather_pairs([layer.weight], world)
X, Dm = layer.weight.analog_ctx.pending()
w0 = layer.tile.tile_weights().clone()
AnalogOptimizer([layer.weight], AnalogSGD(), lr=0.5, seed=0).step()
torch.save({"x": x_local, "d": d_local, "X": X, "D": Dm, "w0": w0, "w1": layer.tile.tile_weights()},
           f"{sys.argv[1]}/rank{rank}.pt")
dist.destroy_process_group()
