"""ConfigMap.to_dict / to_json of a map holding a config of another registered type (NF4Config, which quantize_
takes) failed with "AttributeError: 'NF4Config' object has no attribute 'to_dict'"; it now says which pattern
holds a config that JSON does not carry, and what it carries.

Reference: the map's own entries (the test builds them) and a map of QuantConfig entries, which still round-trips.
"""
from __future__ import annotations

import pytest

from medquant.quant import QuantConfig
from medquant.quant.api import ConfigMap


def test_a_map_with_another_config_type_names_the_pattern():
    nf4 = pytest.importorskip("medquant.qlora").NF4Config()
    cmap = ConfigMap({"re:.*mlp.*": QuantConfig(4), "re:.*attn.*": nf4})
    for write in (cmap.to_dict, cmap.to_json):
        with pytest.raises(TypeError, match=r"'re:\.\*attn\.\*'.*NF4Config.*QuantConfig"):
            write()
    ok = ConfigMap({"re:.*mlp.*": QuantConfig(4), "x": None}, skip=["y"])
    assert ConfigMap.from_json(ok.to_json()) == ok
