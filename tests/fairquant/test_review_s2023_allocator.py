"""Review (s2023) of FairQuantAllocator, its importance and its allocation rules: each test failed before its fix."""
import pytest
import torch

from medquant.fairquant import FairQuantAllocator, GroupImportance
from tests.fairquant.fq_helpers import grouped_batches, tiny_mlp


def test_a_refit_that_fails_leaves_the_previous_allocation_whole():
    """A failed fit_importance / fit_reduced must not mix the new layers with the old bits (bit_map() raised
    KeyError and state() saved the old bit map under the new weight shapes and group counts)."""
    alloc = FairQuantAllocator(target_bits=3.0, scope="tensor", tolerance=0.6, progress=False)
    alloc.fit(tiny_mlp(), grouped_batches())
    before_state, before_bits = alloc.state(), alloc.bit_map()
    # one per-tensor scope of a single layer: 2 or 4 bits, never within 0.6 of 3.0
    other = GroupImportance(maps={0: {"z": torch.rand(4, 5)}, 1: {"z": torch.rand(4, 5)}}, counts={0: 3, 1: 4},
                            metric="grape", batches=1)
    with pytest.raises(ValueError, match="could not meet"):
        alloc.fit_importance(other)
    with pytest.raises(ValueError, match="could not meet"):
        alloc.fit_reduced({"z": torch.rand(4, 5)})
    assert alloc.bit_map() == before_bits
    assert alloc.state() == before_state
    assert set(alloc.reduced_) == set(alloc.scores_) == set(alloc.weight_shape_) == {"fc1", "fc2"}
