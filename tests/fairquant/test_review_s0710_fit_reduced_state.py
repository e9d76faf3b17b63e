"""FairQuantAllocator.fit_reduced after fit: the new allocation no longer comes from the calibration, so state() must
not carry the old calibration summary (group_counts / calibration_batches) next to it."""
import torch

from medquant.fairquant import FairQuantAllocator
from tests.fairquant.fq_helpers import grouped_batches, tiny_mlp


def test_fit_reduced_after_fit_drops_the_old_calibration_summary():
    model = tiny_mlp()
    alloc = FairQuantAllocator(target_bits=4.0, scope="channel", tolerance=0.5, progress=False)
    alloc.fit(model, grouped_batches())
    assert "group_counts" in alloc.state()  # the summary of that calibration
    g = torch.Generator().manual_seed(3)
    reduced = {"fc1": torch.rand(model.fc1.weight.shape, generator=g),
               "fc2": torch.rand(model.fc2.weight.shape, generator=g)}
    alloc.fit_reduced(reduced)
    st = alloc.state()
    assert "group_counts" not in st and "calibration_batches" not in st
    assert not hasattr(alloc, "importance_")
    # what the allocator saved matches a fresh allocator fitted on the same maps alone
    fresh = FairQuantAllocator(target_bits=4.0, scope="channel", tolerance=0.5, progress=False).fit_reduced(reduced)
    assert st == fresh.state()
