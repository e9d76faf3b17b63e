"""Shared pytest set-up for medquant's tests.

``tests`` is a package (run ``python -m pytest tests`` from the repository root): helper modules import as
``tests.<folder>.<module>`` and the tiny-model zoo as ``medquant.testing.zoo``.

The data sets live outside the repository. ``medquant.data.default_data_dir`` needs ``$MEDQUANT_DATA_DIR`` (or an
explicit argument); when it is unset, this file points it at the repository's sibling folder ``../shared/data``
if that exists, so tests that read real data find it (they skip when it is absent).
"""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()

if not os.environ.get("MEDQUANT_DATA_DIR") and SHARED_DATA.is_dir():
    os.environ["MEDQUANT_DATA_DIR"] = str(SHARED_DATA)

# The CPU kernels compute in bfloat16 by default where the CPU has native bf16; the tests compare quantized
# layers with float32 references, so they run with float32 compute unless a test sets another dtype
# (tests/kernels/test_cpu_backend.py checks the bfloat16 paths).
os.environ.setdefault("MEDQUANT_CPU_COMPUTE_DTYPE", "float32")

# The kernel tests run the Triton kernels in the CPU interpreter, which Triton reads when it is first imported.
# Some test modules import packages that import Triton at collection time (compressed-tensors does), before
# tests/kernels/conftest.py is collected, so the switch is set here, in the first conftest pytest imports.
os.environ.setdefault("TRITON_INTERPRET", "1")



# AOTInductor (``compile_decoder``, the AOT benchmarks, ``examples/fast_cpu_decode.py``) compiles a C++ wrapper per
# program, about 5 s of g++ each on a 2-core machine at its default ``-O1 -g1``. The wrapper only sequences kernel
# calls: compiled at ``-O0`` without line tables it computes the same results (every test compares them with
# ``generate`` or the eager model) about 1.5 s sooner per program. Set before torch reads its config; subprocesses
# (the examples) inherit it.
os.environ.setdefault("AOT_INDUCTOR_COMPILE_WRAPPER_OPT_LEVEL", "O0")
os.environ.setdefault("AOT_INDUCTOR_ENABLE_LINE_TABLES", "0")
@pytest.fixture
def one_torch_thread():
    """Run a test with one intra-op torch thread, restored afterwards: on tiny tensors the OpenMP threads only add
    start-up and contention costs (a learned-rounding test ran ~15x slower with two threads on a shared 2-core
    machine). Folders and modules opt in with ``pytest.mark.usefixtures("one_torch_thread")``."""
    import torch  # here, not at the top: the environment above is set before anything imports torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
