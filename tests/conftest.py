"""Shared fixtures: a small real corpus (files of this interpreter's standard library) and
one intra-op thread for modules of tiny-matrix tests. Plain helpers are in ``helpers.py``."""

import os
import shutil
from pathlib import Path

import pytest
from helpers import CORPUS_FILES, STDLIB


def _share_the_cores() -> None:
    """With several pytest-xdist workers, each worker and the processes its tests start use the
    cores of one worker (``OMP_NUM_THREADS``): more threads than cores spin against each other."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


_share_the_cores()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tiny-matrix tests with one intra-op thread: they gain nothing from more,
    and on a busy 2-core machine spinning worker threads slow each op by orders of magnitude."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    for name in CORPUS_FILES:
        src = STDLIB / name
        shutil.copyfile(src, d / name.replace("/", "_"))
    return d


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dsv3-cache")
