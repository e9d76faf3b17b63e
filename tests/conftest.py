"""Shared pytest set-up for medquant's tests."""

import os
import sys

# Make helpers that live in tests/ (``zoo.py``...) importable from tests in sub-folders.
_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)
