"""Shared test setup.

* Measured hardware choices go to a temporary cache, not ~/.cache.
* ``python -m pytest --device cuda`` (default ``cpu``) runs the suite on that device:
  every run, evaluation, baseline and pre-training that would have chosen the CPU (the
  library's default ``device="cpu"``, an explicit ``"cpu"``, or ``"auto"``) runs there
  instead (the command-line processes that tests start resolve ``--device auto``, the
  command line's default, to the GPU by themselves). Tests marked ``cpu_only`` (they check
  a fact of the CPU: thread counts, a CPU-measured choice, exact CPU numbers) are skipped
  there; tests
  marked ``gpu`` run only there, on the devices they name (no redirect).
* ``--device cpu:0`` is a dry run of that mode on the CPU: every redirect happens, so a test
  that checks a CPU-only fact without its ``cpu_only`` mark fails there, without a GPU.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device", default="cpu",
        help="the device the tests run on: cpu (default), cuda or cuda:N",
    )  # fmt: skip


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device (runs under --device cuda)")
    config.addinivalue_line("markers", "cpu_only: checks a CPU-only fact (skipped on a GPU)")
    device = torch.device(config.getoption("--device"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"--device {device} was asked for but CUDA is not available")
    if device.type not in ("cpu", "cuda"):
        raise pytest.UsageError(f"--device must be cpu, cuda or cuda:N, got {device}")


def _redirected(device: str) -> bool:
    """Whether the runs of the tests move from the CPU to ``device`` (see the docstring)."""
    return device != "cpu"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    device = config.getoption("--device")
    on_gpu = torch.device(device).type == "cuda"
    for item in items:
        if not on_gpu and "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="needs --device cuda"))
        if _redirected(device) and "cpu_only" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="checks a CPU-only fact"))


def pytest_report_header(config: pytest.Config) -> str:
    device = torch.device(config.getoption("--device"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU"
    return f"selmix tests on {device} ({name})"


@pytest.fixture(scope="session")
def device(pytestconfig: pytest.Config) -> str:
    """The device the tests run on (``--device``)."""
    return str(pytestconfig.getoption("--device"))


@pytest.fixture(autouse=True, scope="session")
def _hardware_cache(tmp_path_factory):
    # selmix.engine.hardware caches its measured "auto" choices; tests (and the CLI processes they
    # start, which inherit the environment) keep theirs out of the user's cache
    previous = os.environ.get("SELMIX_CACHE_DIR")
    os.environ["SELMIX_CACHE_DIR"] = str(tmp_path_factory.mktemp("selmix-cache"))
    yield
    if previous is None:
        os.environ.pop("SELMIX_CACHE_DIR", None)
    else:
        os.environ["SELMIX_CACHE_DIR"] = previous


@pytest.fixture(autouse=True)
def _run_on_the_test_device(device, request, monkeypatch):
    """Under ``--device cuda``: the CPU (and "auto") a test would run on becomes the GPU."""
    # cpu_only tests stay on the CPU; gpu tests name each device they use themselves
    if not _redirected(device) or {"cpu_only", "gpu"} & set(request.keywords):
        yield
        return
    # the module, not the function `selmix.evaluate` that the package exports
    original = importlib.import_module("selmix.engine.evaluate").resolve_device

    def on_test_device(requested=None):
        if requested is None or str(requested) in ("auto", "cpu"):
            requested = device
        return original(requested)

    for name, module in list(sys.modules.items()):
        if name.split(".")[0] == "selmix" and getattr(module, "resolve_device", None) is original:
            monkeypatch.setattr(module, "resolve_device", on_test_device)
    yield
