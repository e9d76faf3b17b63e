""":func:`medquant.pipeline.compress` with an ``out`` that cannot become the checkpoint folder (an existing file, or a
path beneath a file): refused before the first stage changes the model (``NotADirectoryError``, as the save raises),
as the stages' own requirements are; the save refused it only after every stage had pruned / trained / quantized the
model in place."""
from __future__ import annotations

import pytest
import torch

from medquant import QuantConfig
from medquant.pipeline import PruneStage, QuantStage, compress
from medquant.testing.zoo import ZOO_BY_NAME


@pytest.mark.parametrize("out", ["a_file", "a_file/sub"])
def test_an_out_that_cannot_be_a_folder_is_refused_before_any_stage(tmp_path, out):
    e = ZOO_BY_NAME["llama"]
    torch.manual_seed(0)
    model = e.build().eval()
    (tmp_path / "a_file").write_text("mine")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NotADirectoryError, match=r"a_file exists and is not a folder"):
        compress(model, prune=PruneStage(0.5, 0.5, importance="magnitude"),
                 quantize=QuantStage(QuantConfig(4, group_size=32), method="rtn"), out=tmp_path / out,
                 progress=False)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)  # untouched
    assert (tmp_path / "a_file").read_text() == "mine"
