"""A study config and its plan: the shipped configs (one per arm), quick overrides, and the grid of
training jobs (teachers, students, KD, fixes, controls, budget sweep) in dependency order."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from circuitkd.config import ExperimentCfg
from circuitkd.errors import CircuitKDError
from circuitkd.run.tasks import control_task_args


CONFIG_DIR = Path(__file__).parent.parent / "configs"

#: The study's arms (``circuitkd run --arm``): each a shipped config and the ``--quick`` overrides for it.
ARMS = {"nli": ("default.json", "quick.json"), "vision": ("vision.json", "vision_quick.json")}

def default_config() -> ExperimentCfg:
    """The grid shipped with the package (``circuitkd/configs/default.json``)."""
    return ExperimentCfg.from_json(CONFIG_DIR / "default.json")


def quick_overrides(task: str = "synthetic_nli") -> dict[str, Any]:
    """The ``--quick`` preset: overrides applied on top of any config for a smoke run.

    Image tasks get the vision arm's (``vision_quick.json``: ViT sizes), every other task the NLI arm's.
    """
    image = task in ("colored_mnist", "shortcut_mnist", "waterbirds", "celeba")
    return json.loads((CONFIG_DIR / ARMS["vision" if image else "nli"][1]).read_text())


def arm_config_path(arm: str) -> Path:
    """The shipped config of the study's arm ``arm`` ("nli" or "vision")."""
    if arm not in ARMS:
        raise CircuitKDError(f"unknown arm {arm!r}; the study's arms are {sorted(ARMS)}")
    return CONFIG_DIR / ARMS[arm][0]


def load_config(path: Optional[str | Path] = None, *, quick: bool = False, **overrides: Any) -> ExperimentCfg:
    """A config from ``path`` (the default one when None), with the quick preset and ``overrides`` applied."""
    cfg = default_config() if path is None else ExperimentCfg.from_file(path)
    changes = {**(quick_overrides(cfg.task) if quick else {}),
               **{k: v for k, v in overrides.items() if v is not None}}
    if changes:
        data = {**cfg.to_dict(), **changes}
        if quick:
            data["name"] = f"{cfg.name}-quick"
        cfg = ExperimentCfg.from_dict(data)
    return cfg


@dataclass(frozen=True)
class Job:
    """One model of the grid: how it is made, and the jobs whose models it needs."""

    id: str
    role: str            # "teacher" or "student"
    variant: str         # teacher | alone | kd | debiased_kd | fix
    method: str          # the teacher's (or the alone student's) debiasing method
    seed: int
    alpha: Optional[float] = None
    fix: Optional[str] = None
    deps: tuple = ()
    steps: Optional[int] = None  # a budget other than the role's default (the budget sweep)


def _fmt_alpha(alpha: float) -> str:
    return f"{alpha:g}"


def plan(cfg: ExperimentCfg) -> list[Job]:
    """Every job of the grid, in an order where each job comes after the jobs it needs."""
    jobs: list[Job] = []
    methods = ("none", *cfg.methods)
    for seed in cfg.seeds:
        s = f"s{seed}"
        plain_student = f"student-alone-none-{s}"
        for m in methods:
            # confreg self-distils from a plain model of the same kind, trained first.
            confreg = m == "confreg"
            jobs.append(Job(f"teacher-{m}-{s}", "teacher", "teacher", m, seed,
                            deps=(f"teacher-none-{s}",) if confreg else ()))
            jobs.append(Job(f"student-alone-{m}-{s}", "student", "alone", m, seed,
                            deps=(plain_student,) if confreg else ()))
        for m in methods:
            teacher = f"teacher-{m}-{s}"
            for a in cfg.alphas:
                jobs.append(Job(f"student-kd{_fmt_alpha(a)}-{m}-{s}", "student", "kd", m, seed, alpha=a, deps=(teacher,)))
            if m != "none":
                deps = (teacher, plain_student) if m == "confreg" else (teacher,)
                jobs.append(Job(f"student-dkd-{m}-{s}", "student", "debiased_kd", m, seed,
                                alpha=cfg.debiased_kd_alpha, deps=deps))
                for fix in cfg.fixes:
                    jobs.append(Job(f"student-{fix}-{m}-{s}", "student", "fix", m, seed, alpha=cfg.fix_alpha,
                                    fix=fix, deps=(teacher,)))
        if cfg.controls and control_task_args(cfg) is not None:
            # Learnability and capacity controls: the same models on the task with every shortcut
            # uncorrelated with the label. A debiased teacher's findings only count if these learn.
            jobs.append(Job(f"teacher-control-{s}", "teacher", "control", "none", seed))
            jobs.append(Job(f"student-control-{s}", "student", "control", "none", seed))
        sweep = cfg.sweep_method
        for steps in cfg.student_budgets:
            if steps == cfg.student_steps:
                continue  # the grid's own KD students at this alpha are that budget's point
            for m in ("none", sweep) if sweep else ("none",):
                jobs.append(Job(f"student-kd{_fmt_alpha(cfg.budget_alpha)}-{m}-b{steps}-{s}", "student", "kd", m,
                                seed, alpha=cfg.budget_alpha, steps=steps, deps=(f"teacher-{m}-{s}",)))
    order = {j.id: i for i, j in enumerate(jobs)}
    # Teachers first (students need them), then by seed, so results arrive seed by seed.
    return sorted(jobs, key=lambda j: (j.role != "teacher", j.seed, order[j.id]))

