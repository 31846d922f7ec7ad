"""Shared test setup: measured hardware choices go to a temporary cache, not ~/.cache."""

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _hardware_cache(tmp_path_factory):
    # selmix.hardware caches its measured "auto" choices; tests (and the CLI processes they
    # start, which inherit the environment) keep theirs out of the user's cache
    previous = os.environ.get("SELMIX_CACHE_DIR")
    os.environ["SELMIX_CACHE_DIR"] = str(tmp_path_factory.mktemp("selmix-cache"))
    yield
    if previous is None:
        os.environ.pop("SELMIX_CACHE_DIR", None)
    else:
        os.environ["SELMIX_CACHE_DIR"] = previous
