"""End-to-end tests: the ``dsv3`` command in subprocesses, several processes under torchrun,
the launch scripts and SLURM. Every test here carries the ``e2e`` marker (``pytest -m "not
e2e"`` runs only the in-process tests); those that start several processes also carry
``distributed``."""

import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/tests/e2e/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.e2e)
