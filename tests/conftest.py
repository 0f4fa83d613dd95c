"""Test session setup: without a GPU, Triton kernels run in Triton's CPU interpreter.

TRITON_INTERPRET must be set before triton is first imported, hence here, at collection.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# The ahead-of-time compile of every Triton launch configuration (`tests/test_gpu_compile.py`)
# takes about 17 minutes of one of CI's two cores. When those tests are selected it starts as
# soon as collection ends, in worker processes at the lowest priority, so that it runs on
# whatever core the other tests leave idle, and the tests that read it run last.
AOT_RUN = pytest.StashKey()


@pytest.hookimpl(trylast=True)      # after -k / -m deselection: only when those tests will run
def pytest_collection_modifyitems(session, config, items):
    if os.environ.get("PYTEST_XDIST_WORKER"):      # one per worker would be too many: the fixture starts it
        return
    waiting = [item for item in items if "triton_reports" in getattr(item, "fixturenames", ())]
    if waiting:
        from sba_kernels import triton_aot

        config.stash[AOT_RUN] = triton_aot.CompileRun(archs=(90, 80), workers=2, nice=19)
        items[:] = [item for item in items if item not in waiting] + waiting


@pytest.fixture(scope="session")
def aot_compile_run(request):
    """The compile of every Triton launch configuration for sm_90 and sm_80
    (`triton_aot.CompileRun`): the one started at collection, or, under pytest-xdist, where
    collection starts none, one started now."""
    from sba_kernels import triton_aot

    return request.config.stash.get(AOT_RUN, None) or triton_aot.CompileRun(archs=(90, 80), workers=2)


def pytest_unconfigure(config):
    run = config.stash.get(AOT_RUN, None)
    if run is not None:
        run.stop()
