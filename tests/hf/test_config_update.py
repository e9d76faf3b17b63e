"""``MedQuantConfig.update`` / ``from_dict(..., **kwargs)`` validate as the constructor does.

Oracles: the constructor itself (what it refuses, update refuses with the same exception type, and what it
builds, update gives), and the contract of transformers' ``QuantizationConfigMixin.update`` (the kwargs it does
not use come back, the caller's dict is not changed), which ``AutoQuantizationConfig.from_pretrained`` relies on:
it passes every ``from_pretrained`` keyword to ``update``.
"""
from __future__ import annotations

import pytest
from transformers.utils.quantization_config import QuantizationConfigMixin

import medquant as mq
from medquant.hf.config import MedQuantConfig


def _base() -> MedQuantConfig:
    return MedQuantConfig(mq.QuantConfig(4, group_size=32), skip=["lm_head"])


BAD = {
    "bits as a float": {"config": {"bits": 7.5}},
    "config of the wrong type": {"config": "4bit"},
    "config and config_map together": {"config_map": {"re:.*proj": 8}},
    "a pattern map with an invalid config": {"config": None, "config_map": {"re:.*proj": {"bits": 9}}},
    "a newer format version": {"format_version": 99},
    "a bool format version": {"format_version": True},
    "another quant_method": {"quant_method": "gptq"},
    "skip as a single string": {"skip": "lm_head"},
    "skip with a non-string entry": {"skip": ["lm_head", 3]},
    "modules entry that is not a recipe": {"modules": {"model.q_proj": 4}},
    "modules not a mapping": {"modules": ["model.q_proj"]},
    "skipped_modules as a single string": {"skipped_modules": "lm_head"},
    "medquant_version not a string": {"medquant_version": 7},
}


@pytest.mark.parametrize("bad", list(BAD.values()), ids=list(BAD))
def test_update_refuses_what_the_constructor_refuses_and_leaves_the_config_unchanged(bad):
    cfg = _base()
    before = cfg.to_dict()
    with pytest.raises((TypeError, ValueError)) as ref:  # the constructor given the same fields
        MedQuantConfig(**{**before, **bad})
    with pytest.raises(type(ref.value)) as got:
        cfg.update(**bad)
    assert "unchanged" in str(got.value)
    assert cfg.to_dict() == before and cfg == _base()


def test_update_sets_fields_as_the_constructor_builds_them_and_returns_the_unused_kwargs():
    cfg = _base()
    kwargs = {"config": 8, "skip": ("lm_head", "re:.*vision.*"), "revision": "main", "bits": 7.5,
              "trust_remote_code": False}
    snapshot = dict(kwargs)
    unused = cfg.update(**kwargs)
    assert unused == {"revision": "main", "bits": 7.5, "trust_remote_code": False}
    assert kwargs == snapshot  # the caller's dict is left as it was (as the mixin does)
    assert cfg == MedQuantConfig(config=mq.QuantConfig(8), skip=["lm_head", "re:.*vision.*"])
    assert cfg.config == mq.QuantConfig(8).to_dict() and cfg.skip == ["lm_head", "re:.*vision.*"]
    # replacing the one config by a map needs config=None in the same call, as in the constructor
    assert cfg.update(config=None, config_map={"re:.*proj": 4, "lm_head": None}) == {}
    assert cfg == MedQuantConfig({"re:.*proj": 4, "lm_head": None}, skip=["lm_head", "re:.*vision.*"])
    # the transformers mixin's contract: nothing used, everything returned
    assert QuantizationConfigMixin.update(cfg, nothing=1) == cfg.update(nothing=1) == {"nothing": 1}


def test_update_does_not_overwrite_methods_or_properties():
    """Only the fields are set: a method or property name comes back unused (the mixin's ``hasattr`` test would
    shadow ``plan`` by an instance attribute, and fail on the read-only ``has_plan``)."""
    cfg = _base()
    assert cfg.update(plan=1, has_plan=False, to_dict=None) == {"plan": 1, "has_plan": False, "to_dict": None}
    assert callable(cfg.plan) and cfg.has_plan and cfg == _base()


def test_from_dict_validates_its_keyword_overrides():
    d = _base().to_dict()
    with pytest.raises(ValueError, match="format version"):
        MedQuantConfig.from_dict(d, format_version=99)
    cfg, unused = MedQuantConfig.from_dict(d, return_unused_kwargs=True, skip=["re:.*head"], revision="main")
    assert unused == {"revision": "main"}
    assert cfg == MedQuantConfig(mq.QuantConfig(4, group_size=32), skip=["re:.*head"])
    assert MedQuantConfig.from_dict(d) == _base()
