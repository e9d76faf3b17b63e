"""The public API (the components medquant is built around, and every name of ``medquant.__all__``) is importable
from the top-level package."""
import subprocess
import sys

import medquant

CORE_NAMES = ["ComplexityScorer", "AdaptiveQuantizer", "FairQuantAllocator", "BAQWrapper", "StructuredPruner",
              "Distiller", "QLoRAAdapter", "QuantConfig", "quantize_", "save", "load"]


def test_every_public_name_resolves():
    for name in medquant.__all__:
        assert getattr(medquant, name) is not None, name
    for name in CORE_NAMES:
        assert name in medquant.__all__


def test_unknown_attribute_raises():
    try:
        medquant.NotAThing  # noqa: B018
    except AttributeError as e:
        assert "NotAThing" in str(e)
    else:
        raise AssertionError("expected AttributeError")


def test_import_is_light():
    # importing medquant must not import transformers, triton or the big components
    code = ("import sys, medquant; heavy = [m for m in ('transformers', 'triton', 'medquant.prune', "
            "'medquant.qlora', 'peft', 'bitsandbytes') if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"import medquant pulled in: {out}"
