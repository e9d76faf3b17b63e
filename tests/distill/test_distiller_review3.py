"""Review round 3 of :meth:`medquant.distill.Distiller.fit`: ``steps`` optimizer steps, repeating passes over the data;
data that cannot be read again (a generator) gives fewer steps, and the caller is told."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from medquant.distill import Distiller
from medquant.testing.zoo import ZOO_BY_NAME


def _pair():
    e = ZOO_BY_NAME["llama"]
    teacher = e.build()
    return teacher, copy.deepcopy(teacher), e.inputs(teacher)


def test_fit_repeats_a_list_for_the_steps_asked_without_a_warning():
    teacher, student, batch = _pair()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        losses = Distiller(teacher, student).fit([batch], steps=3, lr=1e-3, progress=False)
    assert len(losses) == 3


def test_fit_on_a_generator_shorter_than_the_steps_asked_says_how_many_steps_ran():
    # a generator is read once: fit(gen, steps=3) over 1 batch took 1 optimizer step and returned 1 loss
    # without a word, although the docstring promises passes repeated "as needed" for the steps asked
    teacher, student, batch = _pair()
    ref = copy.deepcopy(student)
    with pytest.warns(UserWarning, match="took 1 of the 3 steps asked"):
        losses = Distiller(teacher, student).fit((b for b in [batch]), steps=3, lr=1e-3, progress=False)
    assert len(losses) == 1
    # the step that ran is that of a list of the batch (the warning changes nothing else)
    want = Distiller(teacher, ref).fit([batch], steps=1, lr=1e-3, progress=False)
    assert losses == want
    for (name, p), q in zip(student.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), name


def test_fit_on_a_generator_for_several_epochs_says_only_one_pass_ran():
    # epochs=2 over a generator trained one pass and returned its losses without a word
    teacher, student, batch = _pair()
    with pytest.warns(UserWarning, match="ran 1 of the 2 epochs asked"):
        losses = Distiller(teacher, student).fit((b for b in [batch]), epochs=2, lr=1e-3, progress=False)
    assert len(losses) == 1
