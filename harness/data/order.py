"""The order in which samples are read: deterministic per seed, resumable mid-epoch.

Each epoch reads a permutation of the samples seeded by seed + epoch (or 0..n-1 without
shuffling). A step takes the next micro_batch_size * world_size indices of it; rank r gets
the r-th micro_batch_size of them, so ranks read disjoint samples and the same number of
batches. The incomplete global batch at the end of an epoch is skipped (with shuffling, the
skipped samples differ from epoch to epoch).

The state is {"epoch", "position"}: position counts the indices of the epoch already taken
by all ranks together, so it does not depend on how a global batch splits among ranks.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np


class ResumableOrder:
    def __init__(self, num_items: int, seed: int, shuffle: bool = True):
        if num_items <= 0:
            raise ValueError(f"no samples to order (num_items = {num_items})")
        self.num_items, self.seed, self.shuffle = num_items, seed, shuffle
        self.epoch = 0
        self.position = 0

    def permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_items)
        return np.random.default_rng(self.seed + epoch).permutation(self.num_items)

    def batches_per_epoch(self, batch_size: int, world_size: int = 1) -> int:
        return self.num_items // (batch_size * world_size)

    def batches(self, batch_size: int, *, rank: int = 0, world_size: int = 1) -> Iterator[list[int]]:
        """This rank's batches of indices, from the saved position on, epoch after epoch, forever.

        The state advances as each batch is handed out, so `state_dict()` taken after
        consuming k batches resumes at batch k + 1.
        """
        step = batch_size * world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if step > self.num_items:
            raise ValueError(f"{self.num_items} samples are fewer than one global batch of {batch_size} x "
                             f"{world_size} ranks; lower the micro-batch size or add data")
        while True:
            if self.position + step > self.num_items:
                self.epoch, self.position = self.epoch + 1, 0
            order = self.permutation(self.epoch)
            while self.position + step <= self.num_items:
                start = self.position + rank * batch_size
                self.position += step
                yield order[start:start + batch_size].tolist()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if not 0 <= state["position"] <= self.num_items:
            raise ValueError(f"data order position {state['position']} is outside 0..{self.num_items}: "
                             f"the checkpoint was taken on other data")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
