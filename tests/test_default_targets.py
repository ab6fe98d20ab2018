"""The default study's models learn the task: the four target lines of the default config.

It trains, for every seed of the shipped default config, the models the targets are about —
the learnability control (teacher on the task with every shortcut uncorrelated with the label),
the capacity control (the student alone on it), the plain teacher and every debiased teacher —
and checks their means over seeds against :data:`circuitkd.config.DEFAULT_TARGETS`, as the
default run does (``summary.md``, "Targets"). Fifteen models, about 6 minutes on two cores, so
it is marked ``targets`` and runs as its own step of ``.ci/run`` (``pytest -m targets``).
"""
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor

import pytest

from circuitkd.run.summary import _Grid, _targets
from circuitkd.run.jobs import _worker_init, run_job
from circuitkd.run.plan import default_config, plan

pytestmark = pytest.mark.targets


def test_default_config_models_reach_their_targets(tmp_path):
    cfg = default_config().replace(student_budgets=())
    assert len(cfg.seeds) >= 3
    wanted = {f"{kind}-s{seed}" for seed in cfg.seeds
              for kind in ("teacher-control", "student-control", "teacher-none", *(f"teacher-{m}" for m in cfg.methods))}
    jobs = [j for j in plan(cfg) if j.id in wanted]
    assert {j.id for j in jobs} == wanted
    with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn"), initializer=_worker_init, initargs=(1,)) as pool:
        rows = list(pool.map(run_job, jobs, [cfg] * len(jobs), [tmp_path] * len(jobs)))
    targets = {t["name"]: t for t in _targets(cfg, _Grid(cfg, rows))}
    report = "\n".join(t["message"] for t in targets.values())
    # 1. learnability control: the teacher learns the rule when no shortcut helps
    assert targets["control_teacher_id"]["ok"] and targets["control_teacher_ood"]["ok"], report
    # 2. capacity control: so can the student
    assert targets["control_student_id"]["ok"] and targets["control_student_ood"]["ok"], report
    # 3. the plain teacher learns the task and leans on the shortcuts
    assert targets["plain_teacher_id"]["ok"] and targets["plain_teacher_ood_max"]["ok"], report
    # 4. at least two debiasing methods learn the task and gain OOD accuracy
    assert targets["debiased_teachers"]["ok"], report
