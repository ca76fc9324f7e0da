"""Exact resume of MMSeg training (tools/train_seg.py): what `mae_transfer.segmentation.train.train` registers.

A run resumed from iter_N.pth continues as the uninterrupted run would have: the same samples in the same order,
augmented the same way, the same drop-path draws. mmengine alone replays N batches through the pipeline (hours on a
long run) and restores no random state. The detectron2 counterpart is `mae_transfer.detection.resume`.
"""
from __future__ import annotations

import itertools
import logging
import random
from typing import Any

import numpy as np
import torch
from mmengine.dataset import InfiniteSampler
from mmengine.hooks import Hook
from mmseg.registry import DATA_SAMPLERS, DATASETS
from torch.utils.data import Dataset as TorchDataset

from mae_transfer.runtime import seeded_cpu_rngs

logger = logging.getLogger("mae_transfer.segmentation")

# A run resumed from iter_N.pth continues as the uninterrupted run would have: the same samples in the same
# order, augmented the same way, the same drop-path draws. mmengine alone replays N batches through the pipeline
# (hours on a long run) and restores no random state.
RNG_KEY = "rng_states"  # checkpoint key of `rng_states()`


def rng_states() -> dict[str, Any]:
    """The python, numpy and torch (CPU, CUDA) random states, as tensors and plain values that the safe
    checkpoint loader accepts."""
    version, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(mt), gauss],
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                      "cached_gaussian": float(cached)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states: dict[str, Any]) -> None:
    version, mt, gauss = states["python"]
    random.setstate((version, tuple(mt), gauss))
    n = states["numpy"]
    np.random.set_state(("MT19937", n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(states["torch"].cpu())  # resume loads checkpoints onto the GPU
    if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in states["cuda"]])


def sample_seed(seed: int, position: int) -> int:
    """The seed of the sample at `position` of a run's training stream."""
    return int(np.random.SeedSequence([seed % 2**63, position]).generate_state(1)[0])


@DATA_SAMPLERS.register_module()
class SeededInfiniteSampler(InfiniteSampler):
    """mmengine's InfiniteSampler (the same index stream per rank), each index paired with the seed of its
    position in the stream (`sample_seed`), and able to start at a position (`start_at`) instead of replaying."""

    def __init__(self, dataset: Any, shuffle: bool = True, seed: int | None = None) -> None:
        self.start = 0
        super().__init__(dataset, shuffle=shuffle, seed=seed)

    def _indices_of_rank(self) -> Any:
        stream = enumerate(self._infinite_indices())
        for position, index in itertools.islice(stream, self.start * self.world_size + self.rank, None,
                                                self.world_size):
            yield sample_seed(self.seed, position), index

    def start_at(self, per_rank: int, seed: int) -> None:
        """Continue the stream of `seed` after this rank's first `per_rank` samples (iteration x batch size)."""
        self.start, self.seed = per_rank, seed
        self.indices = self._indices_of_rank()


@DATASETS.register_module()
class SeededSamples(TorchDataset):
    """The training set, read with (seed, index) items from `SeededInfiniteSampler`: each sample's augmentation
    runs with the python / numpy / torch CPU generators seeded from its place in the stream, so it depends
    neither on the worker that loads it nor on how many workers there are; the process's own random states are
    left as they were (with num_workers=0 that process trains)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = DATASETS.build(dataset) if isinstance(dataset, dict) else dataset

    @property
    def metainfo(self) -> dict:
        return self.dataset.metainfo

    def full_init(self) -> None:
        self.dataset.full_init()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> Any:
        seed, index = item
        with seeded_cpu_rngs(seed):
            return self.dataset[index]


def seed_training_samples(cfg: Any) -> None:
    """Read the training set through `SeededSamples` / `SeededInfiniteSampler` (iteration-based configs, whose
    sampler is mmengine's InfiniteSampler)."""
    loader = cfg.get("train_dataloader")
    sampler = (loader or {}).get("sampler") or {}
    if sampler.get("type") in ("InfiniteSampler", "mmengine.InfiniteSampler"):
        loader.sampler = dict(sampler, type="SeededInfiniteSampler")
        loader.dataset = dict(type="SeededSamples", dataset=loader.dataset)


class _ReplaySkipped:
    """Stands for the training data iterator while mmengine's loop replays the batches a resumed run has
    already trained on (`IterBasedTrainLoop.run`): the sampler already starts after them, so those calls
    load nothing."""

    def __init__(self, iterator: Any, replayed: int) -> None:
        self.iterator, self.replayed = iterator, replayed

    def __iter__(self) -> _ReplaySkipped:
        return self

    def __next__(self) -> Any:
        if self.replayed:
            self.replayed -= 1
            return None
        return next(self.iterator)


class ExactResume(Hook):
    """Every checkpoint holds the random states (`RNG_KEY`); a resumed run restores them, and its sampler starts
    after the samples already trained on; a validation during training leaves the random states as it found
    them (an uninterrupted run validates after the checkpoint a resumed run starts from)."""

    priority = "LOWEST"

    def __init__(self) -> None:
        self.loaded: dict[str, Any] | None = None
        self.before_validation: dict[str, Any] | None = None

    def before_save_checkpoint(self, runner: Any, checkpoint: dict) -> None:
        checkpoint[RNG_KEY] = rng_states()
        sampler = runner.train_loop.dataloader.sampler
        if isinstance(sampler, SeededInfiniteSampler):  # the stream's seed (random when the config sets none)
            checkpoint[RNG_KEY]["sampler_seed"] = sampler.seed

    def after_load_checkpoint(self, runner: Any, checkpoint: dict) -> None:
        self.loaded = checkpoint.get(RNG_KEY)

    def before_train(self, runner: Any) -> None:
        if runner.iter == 0:  # a new run, or load_from
            return
        loop = runner.train_loop
        sampler = loop.dataloader.sampler
        if isinstance(sampler, SeededInfiniteSampler):
            seed = (self.loaded or {}).get("sampler_seed", sampler.seed)
            sampler.start_at(runner.iter * loop.dataloader.batch_size, seed)
            # a new iterator: the old one's workers already hold batches from the stream's start
            loop.dataloader_iterator = _ReplaySkipped(iter(loop.dataloader), runner.iter)
        if self.loaded is not None:  # after iter(): a new iterator draws its base seed from torch's generator
            set_rng_states(self.loaded)
        else:
            logger.warning("the checkpoint holds no random states (written before they were saved): the resumed "
                           "run continues with other random draws than an uninterrupted run")

    def before_val(self, runner: Any) -> None:
        self.before_validation = rng_states()

    def after_val(self, runner: Any) -> None:
        if self.before_validation is not None:
            set_rng_states(self.before_validation)
            self.before_validation = None
