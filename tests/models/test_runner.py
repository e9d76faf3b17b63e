"""One model-on-batch runner: how batches are passed and which output tensor counts as the main one."""
from __future__ import annotations

from collections import UserDict
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from medquant.models import eval_mode, main_output, run_model


class _Echo(nn.Module):
    def forward(self, *args, **kwargs):
        return args, kwargs


def test_run_model_batch_forms():
    m = _Echo()
    x, y = torch.ones(2), torch.zeros(2)
    assert run_model(m, {"a": x}) == ((), {"a": x})
    assert run_model(m, UserDict({"a": x})) == ((), {"a": x})  # any mapping (a BatchEncoding is one)
    assert run_model(m, (x, y)) == ((x, y), {})
    assert run_model(m, [x, y], flag=True) == ((x, y), {"flag": True})
    assert run_model(m, x) == ((x,), {})
    args, _ = run_model(m, (x, y), unpack_sequences=False)
    assert len(args) == 1 and args[0] == (x, y)
    assert run_model(m, {"a": x}, output_hidden_states=True) == ((), {"a": x, "output_hidden_states": True})


def test_main_output_forms():
    t, h = torch.ones(2, 3), torch.zeros(2, 5)
    assert main_output(t) is t
    assert main_output(SimpleNamespace(logits=t, last_hidden_state=h)) is t
    assert main_output(SimpleNamespace(logits=None, last_hidden_state=h)) is h
    assert main_output((t, h)) is t and main_output([h]) is h
    with pytest.raises(TypeError, match="main output tensor"):
        main_output(SimpleNamespace(last_hidden_state=h), hidden_state=False)
    with pytest.raises(TypeError, match="main output tensor"):
        main_output((t,), first_item=False)
    with pytest.raises(TypeError, match="main output tensor"):
        main_output(())
    with pytest.raises(TypeError):
        main_output({"logits": t})


def test_hugging_face_output():
    from medquant.testing.zoo import ZOO_BY_NAME

    entry = ZOO_BY_NAME["llama"]
    model = entry.build()
    inputs = entry.inputs(model)
    with torch.no_grad():
        out = run_model(model, inputs)
        assert torch.equal(main_output(out), model(**inputs).logits)
    bert = ZOO_BY_NAME["bert"]
    model = bert.build()
    with torch.no_grad():
        out = run_model(model, bert.inputs(model))
    assert main_output(out) is out.last_hidden_state
    with pytest.raises(TypeError):
        main_output(out, hidden_state=False, first_item=False)


def test_eval_mode_restores_each_submodule_mode_also_on_error():
    m = nn.Sequential(nn.Dropout(0.5), nn.Linear(2, 2))
    m.train()
    with eval_mode(m):
        assert not m.training and not m[0].training
    assert m.training and m[0].training
    with pytest.raises(RuntimeError), eval_mode(m):
        raise RuntimeError("boom")
    assert m.training and m[0].training
    m.eval()
    with eval_mode(m):
        pass
    assert not m.training


def test_eval_mode_gives_every_submodule_its_own_mode_back():
    # a module shared with a student in train mode, inside a teacher in eval mode: both modes come back as they were
    shared = torch.nn.Dropout(0.5)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), shared, torch.nn.BatchNorm1d(4)).eval()
    shared.train()
    before = [m.training for m in model.modules()]
    assert before == [False, False, True, False]
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == before
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError("body failed")
    assert [m.training for m in model.modules()] == before


def test_placeholder_token_ids_read_the_config_and_its_vision_and_audio_configs():
    """Each id by hand from the configs: the model's own fields, the vision config's (Phi-4-multimodal), and a
    list of ids (Ovis2's visual indicator tokens, whose embeddings the visual embedding table replaces)."""
    from medquant.models import placeholder_token_ids

    def model(**cfg):
        m = nn.Linear(2, 2)
        m.config = SimpleNamespace(**cfg)
        return m

    assert placeholder_token_ids(nn.Linear(2, 2)) == []
    assert placeholder_token_ids(model(image_token_index=7, video_token_id=9, vocab_size=10)) == [7, 9]
    assert placeholder_token_ids(model(vision_config=SimpleNamespace(image_token_id=5), use_cache=True)) == [5]
    assert placeholder_token_ids(model(image_token_id=3, visual_indicator_token_ids=(11, 12, 13))) == [3, 11, 12, 13]
    from medquant.testing.zoo_vlm import EXTRA_ZOO_BY_NAME

    ovis = EXTRA_ZOO_BY_NAME["ovis2"].build()
    assert placeholder_token_ids(ovis) == sorted({ovis.config.image_token_id, *ovis.config.visual_indicator_token_ids})
