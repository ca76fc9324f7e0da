"""Shared fixtures: the real test data (tests/data in the repository; the larger sets of ../shared/data for the tests
marked `large_data`), the strict-skip check of CI, small helpers."""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from torch import nn

from backbones.compat import apply_for_mmseg
from tests.strict_skips import (  # noqa: F401  the hooks of MAE_TRANSFER_STRICT_SKIPS=1 (CI's fresh-clone run)
    pytest_collectreport,
    pytest_runtest_makereport,
    pytest_sessionfinish,
    pytest_terminal_summary,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_DATA = REPO_ROOT / "tests" / "data"
SHARED_DATA = Path(os.environ.get("MAE_TRANSFER_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# Several tests import mmseg directly (its own backbones as parity references), not through backbones.mmseg,
# which applies this itself.
apply_for_mmseg()


def default_sigint() -> None:
    """`preexec_fn` of a test's driver process: SIGINT as a terminal's program has it. A test run started with
    `cmd &` from a script (a background CI job) inherits an ignored SIGINT, which a driver would pass on."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def repo_dataset(name: str) -> Path:
    """Path of a dataset in tests/data (part of the repository: a missing one is an error, not a skip)."""
    path = TEST_DATA / name
    if not path.is_dir():
        pytest.fail(f"in-repository test data missing: {path} (tools/make_test_data.py writes it from ../shared/data)")
    return path


def shared_dataset(name: str) -> Path:
    """Path of a full dataset under ../shared/data (or $MAE_TRANSFER_SHARED_DATA), or skip the test with the
    reason. Only for tests marked `large_data`: the others read tests/data (`repo_dataset`)."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"large test data not found: {path} (expected ../shared/data/{name} beside the repo, or "
                    "MAE_TRANSFER_SHARED_DATA)")
    return path


@pytest.fixture(autouse=True)
def no_stale_log_streams():
    """A tool run in-process under capsys leaves logging handlers (detectron2's `setup_logger` on our logger) that
    write to that test's capture stream; once pytest closes it, the next test's log records would print
    'Logging error' tracebacks into its stderr. Drop such handlers after each test."""
    yield
    for name in ("mae_transfer", "detectron2", "fvcore", ""):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            stream = getattr(handler, "stream", None)
            if stream is not None and getattr(stream, "closed", False):
                logger.removeHandler(handler)


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from 2 threads, and lose a lot when other jobs share the 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fruits_nuts() -> Path:
    """All of fruits_nuts (18 photos, 165 instances)."""
    return repo_dataset("fruits_nuts")


@pytest.fixture
def coco_tiny() -> Path:
    """The 15 redistributable photos of coco_tiny (one crowd RLE annotation), all 80 categories."""
    return repo_dataset("coco_tiny")


@pytest.fixture
def ade20k_sample() -> Path:
    return repo_dataset("ade20k_sample")


@pytest.fixture
def camvid_mini() -> Path:
    """CamVid's layout and label values: generated street scenes (6 train + 3 val), as CamVid itself (CC BY-NC)
    may not be in the repository; tests/data/camvid_layout/README.md."""
    return repo_dataset("camvid_layout")


@pytest.fixture
def camvid_small(tmp_path: Path, camvid_mini: Path) -> Path:
    """2 training + 1 validation CamVid-layout frames (with labels) in tmp_path/camvid: a real cell in seconds."""
    data = tmp_path / "camvid"
    for split in ("train", "trainannot", "val", "valannot"):
        (data / split).mkdir(parents=True)
        for f in sorted((camvid_mini / split).glob("*.png"))[:1 if split.startswith("val") else 2]:
            shutil.copy(f, data / split / f.name)
    return data


@contextlib.contextmanager
def no_init():
    """Make torch.nn.init's in-place initialisers no-ops: parameters are allocated with their real shapes but not
    filled (slow on CPU for detection-size models). For parameter counts and shapes only; the meta device is not
    an option because both ViTs compute their drop-path rates with Tensor.item()."""
    names = [n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda tensor, *a, **k: tensor)
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)
