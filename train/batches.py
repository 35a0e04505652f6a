"""From stored uint8 images to training batches: augmentation (seeded per batch, so a resumed run
sees the same batches), scaling and normalisation, the per-epoch order shared by every process and
each process's share of the batches and of the test set.
"""
from __future__ import annotations

from typing import Optional

import torch

from .config import UserError
from .data import ArrayDataset, DataInfo


def augment_batch(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with ``pad`` zero padding + random horizontal flip, on a uint8 batch."""
    b, c, h, w = x.shape
    dev = x.device
    off = torch.randint(0, 2 * pad + 1, (2, b), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = (off[0][:, None] + torch.arange(h)[None]).to(dev)        # [B, H]
    cols = (off[1][:, None] + torch.arange(w)[None])                # [B, W]
    cols = torch.where(flip[:, None], cols.flip(1), cols).to(dev)
    bi = torch.arange(b, device=dev)[:, None, None]
    out = xp.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]   # [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()


class Preprocess:
    """uint8 batch -> float batch: optional augmentation, scaling to [0,1], optional input noise,
    normalisation, in the model's memory format (see :func:`train.step.prepare_model`).

    Input noise (training batches only, those given a ``generator``): ``x <- clip(x + s xi, 0, 1)``
    with ``xi ~ N(0, 1)`` per pixel, on the [0,1] scale before normalisation, drawn from the
    batch's generator after the augmentation's draws (so a resumed run sees the same noise and
    turning noise on leaves the augmentation unchanged).
    """

    def __init__(self, info: DataInfo, device, dtype=torch.float32, memory_format=torch.contiguous_format,
                 augment: bool = False, input_noise: float = 0.0):
        self.augment = augment
        self.input_noise = float(input_noise)
        self.scale = info.scale
        self.mean = torch.tensor(info.mean, dtype=dtype, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(info.std, dtype=dtype, device=device).view(1, -1, 1, 1)
        self.dtype = dtype
        self.device = device
        self.memory_format = memory_format

    def __call__(self, x_u8: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if generator is not None and self.augment:
            x_u8 = augment_batch(x_u8, generator)
        x = x_u8.to(self.device, non_blocking=True).to(self.dtype) * self.scale
        if generator is not None and self.input_noise > 0:
            xi = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device, x.dtype)
            x = (x + self.input_noise * xi).clamp_(0.0, 1.0)
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=self.memory_format) if x.dim() == 4 else x


def batch_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """A deterministic 63-bit seed for the augmentation of one batch."""
    h = (seed * 1_000_003 + epoch) * 1_000_033 + step
    h = h * 1_009 + rank
    return (h * 0x9E3779B97F4A7C15) % (2 ** 63 - 1)


class TrainBatches:
    """Deterministic, resumable sharded batches of the training set.

    The order of epoch ``e`` comes from ``DistributedSampler(seed=seed).set_epoch(e)`` (with
    one replica when not distributed), so it depends only on (seed, epoch); resuming at
    (epoch, step) skips the first ``step`` batches without loading them.  With W processes
    and a global batch B each rank takes B/W samples: rank r's samples at step i sit at
    positions ``j*W + r`` (i*B/W <= j < (i+1)*B/W) of the same permutation, so the union over
    ranks of one global step is exactly the single-process batch of that step.
    """

    def __init__(self, dataset: ArrayDataset, global_batch: int, world: int, rank: int, seed: int,
                 drop_last: bool = True):
        from torch.utils.data.distributed import DistributedSampler

        if global_batch % world:
            raise UserError(f"batch_size={global_batch} is not divisible by the {world} processes")
        self.dataset = dataset
        self.batch = global_batch // world
        self.world, self.rank, self.seed = world, rank, seed
        self.sampler = DistributedSampler(range(len(dataset)), num_replicas=world, rank=rank,
                                          shuffle=True, seed=seed, drop_last=False)
        per_rank = self.sampler.num_samples
        self.steps_per_epoch = per_rank // self.batch if drop_last else -(-per_rank // self.batch)
        if self.steps_per_epoch == 0:
            raise UserError(f"training set of {len(dataset)} samples is smaller than one batch of {global_batch}")

    def epoch(self, epoch: int, start_step: int = 0):
        """``(step, images, labels)`` of this rank's batches of ``epoch`` from ``start_step``."""
        for step, _, x, y in self.indexed_epoch(epoch, start_step):
            yield step, x, y

    def indexed_epoch(self, epoch: int, start_step: int = 0):
        """``(step, indices, images, labels)``: also the samples' indices in the data set."""
        self.sampler.set_epoch(epoch)
        idx = torch.tensor(list(self.sampler), dtype=torch.long)
        for step in range(start_step, self.steps_per_epoch):
            sel = idx[step * self.batch:(step + 1) * self.batch]
            yield step, sel, self.dataset.images[sel], self.dataset.labels[sel]


def shard_test_set(dataset: ArrayDataset, world: int, rank: int) -> ArrayDataset:
    """Rank ``rank``'s disjoint share of the test set (no padding: counts add up exactly)."""
    if world == 1:
        return dataset
    return ArrayDataset(dataset.images[rank::world], dataset.labels[rank::world])
