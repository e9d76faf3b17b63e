"""load_pruned checks the pruning shape table against the unpruned model and the weights file before it builds
anything: edited sizes cannot allocate, malformed entries are CheckpointErrors naming the entry."""
import json
import resource
import warnings

import pytest
import torch

from medquant.io import MANIFEST_NAME, META_NAME, CheckpointError, CheckpointWarning, atomic
from medquant.prune import StructuredPruner, load_pruned, save_pruned
from medquant.testing.zoo import tiny_cnn


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_cnn()
    x = torch.randn(2, 3, 16, 16)
    StructuredPruner(channel_ratio=0.4, progress=False).prune(model, calib=[x])
    path = tmp_path_factory.mktemp("pruned") / "p"
    save_pruned(model, path)
    return path, model, x


def _edited(saved, tmp_path, edit):
    """A copy of the checkpoint without its manifest (an older save), with the shape table edited."""
    import shutil

    shutil.copytree(atomic.resolve(saved[0]), tmp_path / "p")
    (tmp_path / "p" / MANIFEST_NAME).unlink()
    meta = json.loads((tmp_path / "p" / META_NAME).read_text())
    edit(meta["extras"]["prune"])
    (tmp_path / "p" / META_NAME).write_text(json.dumps(meta))
    return tmp_path / "p"


def test_the_unedited_table_loads_exactly(saved):
    path, model, x = saved
    with torch.no_grad():
        assert torch.equal(load_pruned(path, model=tiny_cnn(seed=1))(x), model(x))


def _first(table, kind):
    return next(n for n, e in table["modules"].items() if e["type"] == kind)


@pytest.mark.parametrize("edit, match", [
    (lambda t: t["modules"][_first(t, "BatchNorm2d")].update(n=10**12), r"\['n'\] must be a positive integer"),
    (lambda t: t["modules"][_first(t, "BatchNorm2d")].update(n=2**20), r"\['n'\] = 1048576 exceeds the unpruned"),
    (lambda t: t["modules"][_first(t, "Conv2d")].pop("in"), r"has no 'in': expected an object with 'in'"),
    (lambda t: t["modules"][_first(t, "Conv2d")].update(out="32"), r"\['out'\] must be a positive integer.*'32'"),
    (lambda t: t["modules"][_first(t, "Conv2d")].update(out=-5), r"\['out'\] must be a positive integer.*-5"),
    (lambda t: t["modules"].update({_first(t, "Conv2d"): []}), r"must be an object \(type and sizes\), got list"),
    (lambda t: t.update(modules=[1]), r"\.modules must be an object \(layer name -> shapes\), got list"),
    (lambda t: t["modules"][_first(t, "Conv2d")].update(type="Linear"), r"saved as 'Linear'.*has Conv2d"),
    (lambda t: t["modules"][_first(t, "BatchNorm2d")].update(n=t["modules"][_first(t, "BatchNorm2d")]["n"] - 1),
     r"but the weights file holds layer"),
])
def test_an_edited_table_is_a_checkpoint_error_naming_the_entry(saved, tmp_path, edit, match):
    path = _edited(saved, tmp_path, edit)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        with pytest.raises(CheckpointError, match=r"medquant.json extras.prune.*" + match):
            load_pruned(path, model=tiny_cnn(seed=1))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 200_000  # KiB: nothing big was allocated
