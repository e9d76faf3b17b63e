"""medquant's benchmarks and experiments (not part of the installed library).

Run each from the repository root as a module, e.g. ``python -m benchmarks.fairquant --quick``; results are
written under ``benchmarks/results/``. Code shared by several benchmarks lives in :mod:`benchmarks.common`, and
benchmarks import each other only through it.
"""
