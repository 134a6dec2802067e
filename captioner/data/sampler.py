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
    """Shuffled indices, reseeded per epoch, sharded by rank under DDP, able to start mid-epoch."""

    def __init__(self, size: int, seed: int, batch_size: int):
        self.size, self.seed, self.batch_size = size, seed, batch_size
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
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
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

    def __init__(self, lengths: list[int], seed: int, batch_size: int, window: int):
        super().__init__(len(lengths), seed, batch_size)
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


def training_sampler(lengths: list[int], seed: int, batch_size: int, length_buckets: int = 0) -> ResumableSampler:
    """Plain shuffle, or batches of similar caption length sorted in windows of `length_buckets` batches."""
    if length_buckets:
        return LengthBucketSampler(lengths, seed, batch_size, length_buckets)
    return ResumableSampler(len(lengths), seed, batch_size)


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
