"""Every random draw of a training run is a pure function of (seed, micro-step, rank).

That is what makes resume exact without pickling RNG states: step k of a resumed run draws the same
data order, timesteps, noise and prompt-dropout mask as step k of an uninterrupted run.
"""
from __future__ import annotations

import hashlib

import torch


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and Python versions (unlike hash())."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def step_generator(seed: int, micro_step: int, rank: int) -> torch.Generator:
    """CPU generator for the noise, timesteps and prompt dropout of one micro-step on one rank."""
    return torch.Generator().manual_seed(mix_seed(seed, micro_step, rank, 1))


class PairBatchSampler(torch.utils.data.Sampler):
    """Infinite, resumable batch sampler: micro-batch k of rank r is a pure function of (seed, k, r).

    Each epoch is a fresh permutation of the n pairs or labelled images (seeded by the epoch); each micro-step takes the
    next world*batch_size indices and gives rank r its slice, so ranks never share pairs within an
    epoch. Items are (index, epoch) so the dataset can seed per-pair augmentation by epoch.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, start_micro_step: int = 0,
                 unit: str = "pairs"):
        if n < batch_size * world:
            raise ValueError(f"the data has {n} usable {unit} but one step needs train.batch_size x processes = "
                             f"{batch_size * world}; lower train.batch_size or add data")
        self.n, self.bs, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.start = start_micro_step
        self.per_epoch = n // (batch_size * world)
        self._perm_epoch, self._perm = -1, None

    def micro_batch(self, k: int) -> list[tuple[int, int]]:
        epoch, within = divmod(k, self.per_epoch)
        if epoch != self._perm_epoch:
            self._perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(mix_seed(self.seed, epoch, 2)))
            self._perm_epoch = epoch
        lo = (within * self.world + self.rank) * self.bs
        return [(int(i), epoch) for i in self._perm[lo:lo + self.bs]]

    def __iter__(self):
        k = self.start
        while True:
            yield self.micro_batch(k)
            k += 1

    def __len__(self) -> int:  # DataLoader asks; the sampler is infinite by design
        return 2**62
