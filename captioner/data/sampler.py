"""A training loader that resumes mid-epoch: same shuffle, same position, as if never interrupted.

Lightning saves a loader's `state_dict()` in each checkpoint and hands it back to `load_state_dict()`
on resume, before the first batch is drawn. The order of an epoch is a pure function of
(seed, epoch), so the state is two numbers: the epoch and how many batches of it the model consumed.
Consumed, not drawn: Lightning prefetches a batch ahead, so the count is advanced when a batch
reaches the model (`callbacks.ResumeState.on_train_batch_start`), not when the loader yields it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler


class ResumableSampler(Sampler[int]):
    """Shuffled indices, reseeded per epoch, sharded by rank under DDP, able to start mid-epoch.

    `twins[i]`, where it is not -1, is an item that may stand in for item i (its mirrored image,
    data/mirror.py): each epoch takes every item of the first `size` once, or its twin in its place with
    probability one half, so an epoch has as many steps with twins as without."""

    def __init__(self, size: int, seed: int, batch_size: int, twins: list[int] | None = None):
        self.size, self.seed, self.batch_size = size, seed, batch_size
        self.twins = torch.tensor(twins) if twins and max(twins) >= 0 else None
        self.epoch = 0
        self.consumed = 0  # batches of this epoch the model has received
        self._start = 0  # batches to skip at the next iteration (set by a resume)
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if distributed else 0
        self.world = dist.get_world_size() if distributed else 1

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at each epoch start
        if epoch != self.epoch:
            self.epoch, self._start = epoch, 0

    def __len__(self) -> int:
        return self.size // self.world  # the whole epoch, even when resuming: Lightning counts from 0

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator)
        if self.twins is not None:
            twin = self.twins[order]
            swap = (twin >= 0) & (torch.rand(self.size, generator=generator) < 0.5)
            order = torch.where(swap, twin, order)
        mine = self.arrange(order[self.rank : len(self) * self.world : self.world])  # every rank the same count
        start, self._start = self._start, 0
        self.consumed = start
        yield from mine[start * self.batch_size :].tolist()

    def arrange(self, order: torch.Tensor) -> torch.Tensor:
        """This rank's order for the epoch; a subclass may regroup it (LengthBucketSampler)."""
        return order


class LengthBucketSampler(ResumableSampler):
    """Batches of captions of similar length, so padding to each batch's longest caption wastes little.

    The epoch's shuffled order is cut into windows of `window` batches; each window is sorted by
    caption length, cut into batches, and those batches are shuffled again. Still a pure function of
    (seed, epoch), so a resumed run sees the same batches.
    """

    def __init__(self, lengths: list[int], seed: int, batch_size: int, window: int, size: int | None = None,
                 twins: list[int] | None = None):
        super().__init__(len(lengths) if size is None else size, seed, batch_size, twins)
        self.lengths, self.window = torch.tensor(lengths), window

    def arrange(self, order: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + 7919 * self.epoch)
        span = self.batch_size * self.window
        out = []
        for s in range(0, len(order), span):
            window = order[s : s + span]
            window = window[torch.argsort(self.lengths[window], stable=True)]
            batches = list(window.split(self.batch_size))
            short = [batches.pop()] if len(batches[-1]) < self.batch_size else []  # stays last: batches keep their bounds
            out += [batches[i] for i in torch.randperm(len(batches), generator=generator)] + short
        return torch.cat(out) if out else order


def training_sampler(lengths: list[int], seed: int, batch_size: int, length_buckets: int = 0,
                     twins: list[int] | None = None) -> ResumableSampler:
    """Plain shuffle, or batches of similar caption length sorted in windows of `length_buckets` batches.
    With `twins` (one per item of an epoch, -1 for none), the twins are the items after those and stand
    in for them (ResumableSampler); `lengths` covers both."""
    size = len(lengths) if twins is None else len(twins)
    if length_buckets:
        return LengthBucketSampler(lengths, seed, batch_size, length_buckets, size, twins)
    return ResumableSampler(size, seed, batch_size, twins)


class ResumableLoader(DataLoader):
    """A DataLoader over a `ResumableSampler` that Lightning recognises as stateful."""

    def __init__(self, *args, **kwargs):
        # each iter() draws a worker base seed: from a private generator, so that re-creating the
        # iterator on resume leaves the global random stream (training noise) where it was
        super().__init__(*args, generator=torch.Generator().manual_seed(0), **kwargs)

    def state_dict(self) -> dict:
        if not isinstance(self.sampler, ResumableSampler):  # replaced, e.g. by use_distributed_sampler=true
            return {}
        return {"epoch": self.sampler.epoch, "consumed": self.sampler.consumed}

    def load_state_dict(self, state: dict) -> None:
        if not state or not isinstance(self.sampler, ResumableSampler):
            return
        batches = -(-len(self.sampler) // self.batch_size)  # ceil: the last batch may be short
        epoch, consumed = state["epoch"], state["consumed"]
        if consumed >= batches:  # saved after the epoch's last batch: the next epoch starts clean
            epoch, consumed = epoch + 1, 0
        self.sampler.epoch, self.sampler._start = epoch, consumed
