"""Teacher and student on different devices: the Distiller moves the batch to the teacher and the teacher's outputs
to the student; the bare ``kd_loss`` names the devices it was given instead of torch's raw mismatch error.

No GPU is needed: the ``meta`` device stands in for "another device" (it holds shapes, no values)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from medquant.distill import Distiller, kd_loss


def test_kd_loss_with_logits_on_different_devices_names_them():
    s, t = torch.randn(2, 5), torch.randn(2, 5)
    with pytest.raises(ValueError, match=r"student logits are on cpu, the teacher logits on meta.*same device"):
        kd_loss(s, t.to("meta"))
    with pytest.raises(ValueError, match=r"student logits are on meta, the teacher logits on cpu"):
        kd_loss(s.to("meta"), t)
    with pytest.raises(ValueError, match=r"mask is on meta, the logits on cpu"):
        kd_loss(s[None], t[None], mask=torch.ones(1, 2, device="meta"))
    # the same device is fine (the hand value is in test_distiller.py)
    want = 4.0 * torch.nn.functional.kl_div(torch.log_softmax(s / 2, -1), torch.log_softmax(t / 2, -1),
                                            log_target=True, reduction="batchmean")
    assert float(kd_loss(s, t, 2.0)) == pytest.approx(float(want), rel=1e-5)


class _RemoteTeacher(torch.nn.Module):
    """A teacher whose parameters sit on ``device`` and whose outputs come back on the CPU (a model split over two
    devices): it records the device of the input it received and returns fixed logits / hidden states."""

    def __init__(self, device, logits, hidden):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(3, device=device))
        self.logits, self.hidden, self.seen = logits, hidden, []

    def forward(self, x, output_hidden_states=False):
        self.seen.append(x.device)
        return SimpleNamespace(logits=self.logits, hidden_states=(self.hidden,))


class _Student(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x, output_hidden_states=False):
        z = self.lin(x)
        return SimpleNamespace(logits=z, hidden_states=(z,))


def test_the_batch_goes_to_the_teachers_device():
    """A teacher on another device than the batch (and the student) got the batch where it was: torch's raw
    device-mismatch error inside the teacher."""
    torch.manual_seed(0)
    student, x = _Student(), torch.randn(6, 4)
    zt = torch.randn(6, 3)
    teacher = _RemoteTeacher("meta", zt, torch.randn(6, 3))
    d = Distiller(teacher, student, alpha=1.0, temperature=2.0)
    kd = d(x)["kd"].detach()
    assert teacher.seen == [torch.device("meta")]
    with torch.no_grad():
        want = 4.0 * torch.nn.functional.kl_div(torch.log_softmax(student(x).logits / 2, -1),
                                                torch.log_softmax(zt / 2, -1), log_target=True,
                                                reduction="batchmean")
    assert float(kd) == pytest.approx(float(want), rel=1e-5)
    # a dict batch: every tensor moves (also inside a list), the rest is passed as it is
    seen = {}

    class DictTeacher(_RemoteTeacher):
        def forward(self, x, extra, flag, output_hidden_states=False):
            seen.update(x=x.device, extra=[e.device for e in extra], flag=flag)
            return SimpleNamespace(logits=self.logits)

    class DictStudent(_Student):
        def forward(self, x, extra, flag, output_hidden_states=False):
            return SimpleNamespace(logits=self.lin(x))

    batch = {"x": x, "extra": [torch.zeros(2)], "flag": "keep"}
    Distiller(DictTeacher("meta", zt, None), DictStudent(), alpha=1.0)(batch)
    assert seen == {"x": torch.device("meta"), "extra": [torch.device("meta")], "flag": "keep"}
    assert batch["x"].device.type == "cpu"  # the caller's batch is not changed


def test_a_teacher_dispatched_by_accelerate_gets_the_batch_as_it_is():
    """A model dispatched over several devices by accelerate moves its own inputs (the hook on its top module); its
    offloaded parameters are on ``meta``, so moving the batch to its first parameter would be wrong."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    zt = torch.randn(6, 3)
    teacher = _RemoteTeacher("meta", zt, None)
    add_hook_to_module(teacher, AlignDevicesHook(io_same_device=True))  # what dispatch_model puts on the top
    x = torch.randn(6, 4)
    Distiller(teacher, _Student(), alpha=1.0)(x)
    assert teacher.seen == [torch.device("cpu")]


def test_the_teachers_outputs_go_to_the_students_device():
    """Teacher logits (and hidden states) on another device than the student's: torch's raw device-mismatch error
    in the KD and feature terms."""
    student = _Student().to("meta")
    x = torch.randn(6, 4, device="meta")
    teacher = _RemoteTeacher("meta", torch.randn(6, 3), torch.randn(6, 3))  # its outputs come back on the CPU
    d = Distiller(teacher, student, alpha=0.5, feature_pairs=[(0, 0)], student_dim=3, teacher_dim=3,
                  task_loss=lambda out, batch: out.logits.float().pow(2).mean())
    parts = d(x)
    assert teacher.seen == [torch.device("meta")]
    assert {k: (v.device.type, v.shape) for k, v in parts.items()} == {
        k: ("meta", torch.Size([])) for k in ("kd", "task", "features", "loss")}
