"""``medquant pipeline --seed``: a seed torch cannot seed with (outside ``[-2**63, 2**64)``) is refused while the
arguments are parsed (exit code 2, one line naming ``--seed``), before the texts are read or the model is loaded, as
``medquant generate`` / ``demo`` refuse theirs; it failed in ``torch.manual_seed`` with "Overflow when unpacking long
long", naming no option."""
from __future__ import annotations

import pytest

import medquant.cli.pipeline
import medquant.cli.prune
from medquant.cli import main
from tests.cli.refusals import refuse_loading


@pytest.mark.parametrize("seed", [str(2**64), str(-2**63 - 1), "99999999999999999999999"])
def test_a_seed_torch_cannot_take_is_refused_naming_the_option(monkeypatch, tmp_path, capsys, seed):
    refuse_loading(monkeypatch, (medquant.cli.prune, "_load"), (medquant.cli.pipeline, "_texts"))
    (tmp_path / "model").mkdir()
    with pytest.raises(SystemExit) as e:
        main(["pipeline", str(tmp_path / "model"), "--out", str(tmp_path / "out"), "--seed", seed])
    lines = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
    assert e.value.code == 2 and len(lines) == 1 and "--seed" in lines[0]


@pytest.mark.parametrize("seed", [2**64 - 1, -2**63])
def test_the_extreme_seeds_torch_takes_are_accepted(monkeypatch, tmp_path, capsys, seed):
    import torch

    torch.manual_seed(seed)  # the reference: torch takes them

    def reached(args):
        raise SystemExit(f"reached with seed {args.seed}")

    monkeypatch.setattr(medquant.cli.pipeline, "_texts", reached)
    (tmp_path / "model").mkdir()
    assert main(["pipeline", str(tmp_path / "model"), "--out", str(tmp_path / "out"), "--seed", str(seed)]) == 2
    assert f"reached with seed {seed}" in capsys.readouterr().err
