"""Fifth review of the CPU kernels: the warnings name the user's line, not medquant's own (or torch's) frames.

Reference: ``warnings.catch_warnings(record=True)`` in the calling file; the recorded ``filename`` must be that file.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from medquant import QuantConfig, QuantLinear
from medquant.kernels import set_cpu_compute_dtype


def _layer() -> QuantLinear:
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(200, 64)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(64, 200, generator=g))
    return QuantLinear.from_float(lin, QuantConfig(4, group_size=64))


def _recorded(fn) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        fn()
    return [w for w in got if issubclass(w.category, RuntimeWarning)]


def test_kernel_warning_from_a_module_call_names_the_calling_line(cpu_settings):
    """A one-time kernel warning (a non-contiguous input copied) raised inside ``layer(x)`` named a frame of
    medquant's dispatch (a fixed stacklevel), whatever the depth of the call. Reference: this file and line."""
    set_cpu_compute_dtype(torch.bfloat16)
    layer = _layer()
    x = torch.randn(200, 6).t()
    line = sys._getframe().f_lineno + 1
    got = _recorded(lambda: layer(x))
    ours = [w for w in got if "non-contiguous" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in got]
    assert (ours[0].filename, ours[0].lineno) == (__file__, line)


@pytest.mark.parametrize("through", ["layer", "native_status"])
def test_native_env_warning_names_the_calling_line(monkeypatch, cpu_settings, through):
    """``$MEDQUANT_NATIVE`` with an unrecognised value, read in a forward of a 4-bit layer (the native kernel's
    dispatch) or by the public ``native_status()``: the fixed stacklevel named this file only from the latter.
    Reference: this file."""
    from medquant.kernels import native

    monkeypatch.setenv(native.ENV_NATIVE, "maybe")
    monkeypatch.setattr(native, "_reported", set())
    layer, x = _layer(), torch.randn(3, 200)
    got = _recorded(lambda: layer(x) if through == "layer" else native.native_status(build=False))
    assert [w.filename for w in got if "MEDQUANT_NATIVE='maybe'" in str(w.message)] == [__file__]


def test_import_time_env_warnings_name_the_importing_line(tmp_path):
    """The CPU backend reads its environment variables when imported; a bad value warned naming medquant's own
    ``kernels/__init__.py`` (the frame importing ``cpu.py``). Reference: the script that ran ``import medquant``."""
    script = tmp_path / "user_script.py"
    script.write_text(
        "import json, warnings\n"
        "with warnings.catch_warnings(record=True) as got:\n"
        "    warnings.simplefilter('always')\n"
        "    import medquant  # noqa: F401\n"
        "print(json.dumps([[str(w.message), w.filename, w.lineno] for w in got\n"
        "                  if issubclass(w.category, RuntimeWarning) and 'MEDQUANT_CPU' in str(w.message)]))\n")
    env = dict(os.environ, MEDQUANT_CPU_COMPUTE_DTYPE="bogus", MEDQUANT_CPU_INT4_KERNEL="bogus",
               MEDQUANT_CPU_NATIVE4_ACTIVATIONS="bogus", MEDQUANT_CPU_PREFILL_KERNEL="bogus")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120,
                         check=True).stdout
    got = json.loads(out.strip().splitlines()[-1])
    names = sorted(m.split("=")[0] for m, _, _ in got)
    assert names == ["$MEDQUANT_CPU_COMPUTE_DTYPE", "$MEDQUANT_CPU_INT4_KERNEL", "$MEDQUANT_CPU_NATIVE4_ACTIVATIONS",
                     "$MEDQUANT_CPU_PREFILL_KERNEL"], got
    assert {(f, line) for _, f, line in got} == {(str(script), 4)}, got


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_stacklevel_helper_counts_the_skipped_frames(depth):
    """The helper on its own: functions compiled under medquant's folder, ``depth + 1`` deep, the innermost one
    warning. The level is ``depth + 2`` (those frames, then this file's lambda), and ``warnings.warn`` with it names
    this file's line. Reference: the depth built here."""
    import medquant
    from medquant.kernels._caller import user_stacklevel

    fake = os.path.join(os.path.dirname(os.path.abspath(medquant.__file__)), "_review5_fake.py")
    src = ("def f0():\n"
           "    level = user_stacklevel()\n"
           "    warnings.warn('from medquant', RuntimeWarning, stacklevel=level)\n"
           "    return level\n")
    for k in range(1, depth + 1):
        src += f"def f{k}():\n    return f{k - 1}()\n"
    scope = {"user_stacklevel": user_stacklevel, "warnings": warnings}
    exec(compile(src, fake, "exec"), scope)  # noqa: S102  (code of our own, filed under medquant's folder)
    levels: list[int] = []
    line = sys._getframe().f_lineno + 1
    got = _recorded(lambda: levels.append(scope[f"f{depth}"]()))
    assert levels == [depth + 2]
    assert [(w.filename, w.lineno) for w in got] == [(__file__, line)]
