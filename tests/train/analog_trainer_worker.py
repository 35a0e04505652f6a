"""Run under torchrun by test_train_analog.py: each process trains the small analog recipe through
the trainer, then saves its own tile weights, so the test can compare the processes' tiles
directly (independently of the trainer's own in-sync check)."""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ffebm.analog import is_analog_parameter
from train import distributed as D
from train import trainer as T
from train.validate import validate
from train.recipes import build_config

out = Path(sys.argv[1])
overrides = dict(a.split("=", 1) for a in sys.argv[2:])
cfg = build_config("digits", overrides)
ctx = D.init("cpu")
t = T.Trainer(validate(cfg), out / "run" if ctx.is_main else None, ctx, log=lambda m: None)
t.setup()
before = {n: p.analog_ctx.tile.tile_weights().clone() for n, p in t.core.named_parameters() if is_analog_parameter(p)}
t.commit(existing=False)
t.fit()
after = {n: p.analog_ctx.tile.tile_weights().clone() for n, p in t.core.named_parameters() if is_analog_parameter(p)}
torch.save({"before": before, "after": after}, out / f"tiles{ctx.rank}.pt")
dist.destroy_process_group()
