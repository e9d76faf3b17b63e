"""Knowledge distillation (SPEC section 6): ``Distiller`` and ``kd_loss``. See docs/distillation.md."""
from .distiller import Distiller, kd_loss

__all__ = ["Distiller", "kd_loss"]
