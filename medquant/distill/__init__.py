"""Knowledge distillation: ``Distiller`` and ``kd_loss``.

``L = alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * task (+ beta * feature matching)``;
:mod:`medquant.distill.distiller` gives every term. Guide: docs/guides/distillation.md."""
from .distiller import Distiller, kd_loss

__all__ = ["Distiller", "kd_loss"]
