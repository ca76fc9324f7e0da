"""Exact resume of detectron2 training: a run stopped at a checkpoint and resumed with `--resume` ends with the
weights of the uninterrupted run.

detectron2 restores the model, optimizer, lr scheduler, iteration and (AMPTrainer) the grad scaler, but not
where the data stream was nor any random state, so a resumed run sees other images, other augmentations and
other drop-path / RoI-sampling draws. Three pieces make it exact:

- `ResumableTrainLoader`, in place of `build_detection_train_loader`: the same infinite stream of indices as
  detectron2's `TrainingSampler` (one seeded `randperm` per epoch), each position's record mapped (augmented)
  with every RNG seeded from (run seed, position), so an item does not depend on which DataLoader worker made it
  or on how many there are (`num_workers` 0 or more); workers take positions in turn, in the order the DataLoader
  collects them. Its state (next position, items waiting in the aspect-ratio buckets) is saved and restored.
- `ExactResume`, a trainer hook: before every iteration, torch / numpy / python RNGs are seeded from (run seed,
  iteration, rank), as `mae_transfer.runtime` does per epoch; its `state_dict` (the run seed, each process's
  loader state) is part of every checkpoint (detectron2 saves the hooks' states with the trainer's).
- `run_seed`: `train.seed`, or when it is negative a random one shared by all processes, which the checkpoint
  keeps for the resumed run.
"""
from __future__ import annotations

import itertools
import logging
import operator
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from detectron2.config import instantiate
from detectron2.data import build_detection_train_loader
from detectron2.data.common import DatasetFromList
from detectron2.engine import HookBase
from detectron2.utils import comm
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mae_transfer.runtime import seed_everything, seeded_cpu_rngs

logger = logging.getLogger(__name__)

_ITEM, _ITERATION = 1, 2  # kinds of derived seeds, so that no two draws share a stream


def derived_seed(*values: int) -> int:
    """A well-mixed 63-bit seed of non-negative integers (numpy's SeedSequence)."""
    return int(np.random.SeedSequence(list(values)).generate_state(1, np.uint64)[0]) >> 1


def run_seed(seed: int) -> int:
    """`train.seed`; a negative one: a random seed, the same in all processes."""
    return int(seed) if seed >= 0 else int(comm.shared_random_seed())


def training_indices(size: int, seed: int, start: int = 0, shuffle: bool = True) -> Iterator[int]:
    """detectron2 `TrainingSampler`'s infinite stream of dataset indices (all processes' positions together),
    from position `start`: whole epochs before it are drawn and dropped, not iterated."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    epoch, offset = divmod(start, size)
    for _ in range(epoch if shuffle else 0):
        torch.randperm(size, generator=generator)
    first = True
    while True:
        order = torch.randperm(size, generator=generator) if shuffle else torch.arange(size)
        yield from order[offset if first else 0:].tolist()
        first = False


class _PositionStream(IterableDataset):
    """Mapped records at this process's stream positions `start`, `start + 1`, ...; a DataLoader worker w of W
    makes positions start + w, start + w + W, ..., which the DataLoader, taking one item from each worker in
    turn, yields in order."""

    def __init__(self, loader: ResumableTrainLoader, start: int) -> None:
        self.loader, self.start = loader, start

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for position, index in self.loader.indexed_positions(self.start + worker, workers):
            yield self.loader.item(position, index)


class ResumableTrainLoader:
    """Batches of mapped training records (lists, as detectron2's train loader), resumable exactly:
    `state_dict()` after a batch, `load_state_dict()` before iterating, continues with the next batch.
    Aspect-ratio grouping as detectron2's (landscape and portrait images batched apart)."""

    def __init__(self, dataset: list[dict], mapper: Any, total_batch_size: int, seed: int, num_workers: int = 0,
                 aspect_ratio_grouping: bool = True) -> None:
        world = comm.get_world_size()
        if total_batch_size <= 0 or total_batch_size % world:
            raise ValueError(f"total_batch_size {total_batch_size} must be a positive multiple of the "
                             f"{world} processes")
        self.records = DatasetFromList(dataset, copy=False)
        self.mapper, self.batch_size, self.seed = mapper, total_batch_size // world, int(seed)
        self.num_workers, self.grouping = int(num_workers), bool(aspect_ratio_grouping)
        self.rank, self.world = comm.get_rank(), world
        self.position = 0  # the next position of this process's stream to take
        self.buckets: list[list[int]] = [[], []]  # positions taken, waiting for a batch of their aspect ratio

    # ------------------------------------------------------------------------------------------- items
    def indexed_positions(self, start: int, step: int = 1) -> Iterator[tuple[int, int]]:
        """(position, dataset index) of this process's stream positions start, start + step, ... (TrainingSampler:
        process r takes the stream's positions r, r + world, ...)."""
        indices = training_indices(len(self.records), self.seed, start * self.world + self.rank)
        return zip(itertools.count(start, step), itertools.islice(indices, 0, None, step * self.world))

    def item(self, position: int, index: int) -> Any:
        """The mapped record `index` at `position`, the same whichever process or worker maps it: RNGs seeded from
        (run seed, position). A record the mapper drops (None) is replaced by the next index's."""
        with seeded_cpu_rngs(derived_seed(self.seed, _ITEM, position * self.world + self.rank)):
            for k in range(len(self.records)):
                mapped = self.mapper(self.records[(index + k) % len(self.records)])
                if mapped is not None:
                    return mapped
        raise RuntimeError("the mapper dropped every training record")

    def _items(self, positions: list[int]) -> list[Any]:
        """The mapped items at a few (sorted) positions: those waiting in the buckets of a restored state."""
        if not positions:
            return []
        wanted = set(positions)
        found = {p: self.item(p, i) for p, i in itertools.takewhile(lambda pi: pi[0] <= positions[-1],
                                                                    self.indexed_positions(positions[0]))
                 if p in wanted}
        return [found[p] for p in positions]

    # ------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "buckets": [list(b) for b in self.buckets]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])
        self.buckets = [list(map(int, b)) for b in state["buckets"]]

    # ------------------------------------------------------------------------------------------- batches
    def _stream(self) -> Iterator[Any]:
        """Mapped items from `self.position` on (DataLoader workers when num_workers > 0)."""
        if self.num_workers == 0:
            return (self.item(p, i) for p, i in self.indexed_positions(self.position))
        # its own generator: creating the loader draws no number from the training's torch RNG
        return iter(DataLoader(_PositionStream(self, self.position), num_workers=self.num_workers,
                               collate_fn=operator.itemgetter(0), generator=torch.Generator()))

    def __iter__(self) -> Iterator[list[Any]]:
        waiting = [self._items(bucket) for bucket in self.buckets]  # mapped again, identically
        for item in self._stream():
            position = self.position
            self.position += 1
            bucket = 0 if not self.grouping or item["width"] > item["height"] else 1
            waiting[bucket].append(item)
            self.buckets[bucket].append(position)
            if len(waiting[bucket]) == self.batch_size:
                batch = waiting[bucket][:]
                del waiting[bucket][:], self.buckets[bucket][:]  # before the yield: the state is after this batch
                yield batch


# the keys of detectron2's build_detection_train_loader that ResumableTrainLoader implements
_LOADER_KEYS = {"_target_", "dataset", "mapper", "total_batch_size", "num_workers", "aspect_ratio_grouping"}


def build_train_loader(cfg: Any, seed: int) -> Any:
    """`cfg.dataloader.train` as a `ResumableTrainLoader`; a loader config it does not cover (another target, a
    sampler, ...) is instantiated as it is, with a warning that a resumed run will see other data."""
    train = cfg.dataloader.train
    target = train.get("_target_")  # the function, or its dotted name in a config read back from yaml
    if isinstance(target, str):
        target = target.replace("detectron2.data.build.", "detectron2.data.")
    if target not in (build_detection_train_loader, "detectron2.data.build_detection_train_loader") or \
            set(train.keys()) - _LOADER_KEYS:
        logger.warning("dataloader.train is not detectron2's build_detection_train_loader with the keys %s: "
                       "built as configured, so --resume will not continue its data stream exactly",
                       sorted(_LOADER_KEYS - {"_target_"}))
        return instantiate(train)
    return ResumableTrainLoader(instantiate(train.dataset), instantiate(train.mapper), train.total_batch_size, seed,
                                train.get("num_workers", 0), train.get("aspect_ratio_grouping", True))


class ExactResume(HookBase):
    """Seeds every RNG before each iteration from (run seed, iteration, rank) and keeps what a resumed run needs
    in the trainer's checkpoints: the run seed and each process's loader state (gathered after each iteration
    when there are several processes, since only the main process saves)."""

    def __init__(self, seed: int, loader: Any) -> None:
        self.seed, self.loader = int(seed), loader
        self.restored = False  # whether a checkpoint gave its state (older checkpoints do not have it)
        self._states = self._loader_states()

    def _loader_states(self) -> list[dict[str, Any]]:
        if not isinstance(self.loader, ResumableTrainLoader):
            return []
        state = self.loader.state_dict()
        return comm.all_gather(state) if comm.get_world_size() > 1 else [state]

    def before_step(self) -> None:
        # CUDA generators too (torch.manual_seed); every draw of the iteration follows from its number
        seed_everything(derived_seed(self.seed, _ITERATION, self.trainer.iter, comm.get_rank()))

    def after_step(self) -> None:
        self._states = self._loader_states()

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "loader_states": self._states}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed, self.restored = int(state["seed"]), True
        states = state.get("loader_states") or []
        if not isinstance(self.loader, ResumableTrainLoader):
            return
        self.loader.seed = self.seed
        if len(states) == comm.get_world_size():
            self.loader.load_state_dict(states[comm.get_rank()])
        elif states:  # another number of processes: each continues after the same share of the stream
            logger.warning("checkpoint written by %d process(es), resumed with %d: the data stream continues at "
                           "the same position, but not exactly as the uninterrupted run", len(states),
                           comm.get_world_size())
            self.loader.load_state_dict({"position": states[0]["position"], "buckets": [[], []]})
        self._states = self._loader_states()
