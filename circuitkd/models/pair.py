"""A teacher/student pair, saved and loaded together."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from circuitkd.errors import CircuitKDError
from circuitkd.models.build import spec_of
from circuitkd.models.checkpoint import atomic_write_dir, load_checkpoint, save_checkpoint


def layer_map(n_teacher: int, n_student: int) -> list[int]:
    """Teacher layer for each student layer, evenly spaced by depth: ``[0, 2, 4, ...]`` when the teacher is
    twice as deep (DistilBERT's initialisation). Used to initialise a student and to patch across models."""
    if n_student > n_teacher:
        raise CircuitKDError(
            f"cannot map a {n_student}-layer student onto a {n_teacher}-layer teacher: the student is deeper"
        )
    return [i * n_teacher // n_student for i in range(n_student)]


@dataclass
class ModelPair:
    """A (debiased) teacher and the student distilled from it, with labels saying how each was made."""

    teacher: Any
    student: Any
    teacher_name: str = "teacher"
    student_name: str = "student"
    info: dict[str, Any] = field(default_factory=dict)

    def __iter__(self):
        return iter((self.teacher, self.student))

    def save(self, path: str | Path) -> Path:
        """Save both models under ``path/teacher`` and ``path/student``, atomically as a whole."""
        import json

        def write(tmp: Path) -> None:
            save_checkpoint(self.teacher, tmp / "teacher", config={"name": self.teacher_name})
            save_checkpoint(self.student, tmp / "student", config={"name": self.student_name})
            (tmp / "pair.json").write_text(json.dumps(
                {"teacher_name": self.teacher_name, "student_name": self.student_name, "info": self.info},
                indent=2, default=str))

        return atomic_write_dir(path, write)

    @classmethod
    def load(cls, path: str | Path, *, device: Optional[str | torch.device] = None) -> "ModelPair":
        import json

        path = Path(path)
        if not (path / "pair.json").exists():
            raise CircuitKDError(f"no model pair at {path} (missing pair.json)")
        meta = json.loads((path / "pair.json").read_text())
        return cls(
            teacher=load_checkpoint(path / "teacher", device=device),
            student=load_checkpoint(path / "student", device=device),
            teacher_name=meta["teacher_name"], student_name=meta["student_name"], info=meta.get("info", {}),
        )

    def describe(self) -> str:
        t, s = spec_of(self.teacher), spec_of(self.student)
        return (f"{self.teacher_name}: {t.backbone} {t.n_layers}L d{t.d_model} {t.n_heads}H  |  "
                f"{self.student_name}: {s.backbone} {s.n_layers}L d{s.d_model} {s.n_heads}H")
