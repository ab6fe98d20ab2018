"""``circuitkd targets``: the accuracy targets of a config checked seed by seed, on the models they name.

A run's targets are met on means over its seeds; whether they survive more seeds is a different
question, and answering it should not need the whole grid. :func:`check_targets` trains only the
models the targets name (the two controls, the plain teacher and each debiased teacher) for the
seeds asked, through the same jobs as ``circuitkd run`` (a finished model is found, not retrained),
and writes ``targets.md`` / ``targets.json``: each target's mean, its line, whether the mean meets it
and its value on every seed, and every target met on the mean but not on every seed.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from circuitkd.config import ExperimentCfg
from circuitkd.errors import CircuitKDError
from circuitkd.run.plan import Job, plan
from circuitkd.run.runner import log_targets, prepare_folder, run_jobs
from circuitkd.run.summary import _Grid, _missed, _seeds_met, _table, _targets, _thin_targets
from circuitkd.run.tasks import control_task_args

TARGETS_MD, TARGETS_JSON = "targets.md", "targets.json"


def target_jobs(cfg: ExperimentCfg) -> list[Job]:
    """The jobs of ``cfg``'s grid that its targets are measured on, in plan order: the two controls, the
    plain teacher and each debiased teacher (a teacher's dependencies are teachers too: confidence
    regularisation's is the plain teacher)."""
    controls = cfg.controls and control_task_args(cfg) is not None
    return [j for j in plan(cfg) if j.variant == "teacher" or (controls and j.variant == "control")]


def check_targets(cfg: ExperimentCfg, out: str | Path, *, log: Optional[Callable[[str], None]] = None
                  ) -> dict[str, Any]:
    """Train (or find) the target models of ``cfg`` for its seeds in ``out`` and check each target on the
    mean and seed by seed; writes ``out/targets.md`` and ``out/targets.json`` and returns
    ``{"targets": [...], "thin_targets": [...], "targets_met": bool, "seeds": [...]}``.
    ``out`` is a new folder or one of the same config but for its seeds, e.g. the run folder of an arm
    (its finished models are reused and its ``config.json`` and results are left as they are)."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if len(cfg.seeds) < 2:
        raise CircuitKDError(f"checking targets seed by seed needs two or more seeds; got {list(cfg.seeds)}")
    out = Path(out)
    prepare_folder(cfg, out, any_seeds=True)
    jobs = target_jobs(cfg)
    t0 = time.perf_counter()
    log(f"circuitkd targets {cfg.name!r}: {len(jobs)} models, seeds {list(cfg.seeds)} -> {out}")
    rows = run_jobs(cfg, jobs, out, log)
    targets = _targets(cfg, _Grid(cfg, [rows[j.id] for j in jobs]))
    result = {"config": cfg.name, "seeds": list(cfg.seeds), "targets": targets,
              "thin_targets": _thin_targets(targets), "targets_met": all(t["ok"] for t in targets),
              "wall_seconds": time.perf_counter() - t0}
    from circuitkd.models.checkpoint import atomic_write_text

    atomic_write_text(out / TARGETS_JSON, json.dumps(result, indent=2, default=str))
    atomic_write_text(out / TARGETS_MD, render_targets(cfg, result))
    log_targets(_missed(targets), result["thin_targets"], len(targets), log)
    log(f"done in {result['wall_seconds']:.0f}s: {out / TARGETS_MD}")
    return result


def render_targets(cfg: ExperimentCfg, result: dict[str, Any]) -> str:
    """``targets.md``: one row per target (mean, line, met on the mean, every seed's value, seeds met alone)."""
    seeds = result["seeds"]
    body = []
    for t in result["targets"]:
        if t["name"] == "debiased_teachers":
            per = _seeds_met(t)
            body.append(["debiased teachers", f"{t['value']} of {len(cfg.methods)} (need {t['target']})",
                         "yes" if t["ok"] else "**no**", t["message"].split(" [", 1)[-1].rstrip("]"), per])
        else:
            line = f"{t['what']} {'≤' if t['at_most'] else '≥'} {t['target']:.2f}"
            body.append([line, f"{t['value']:.3f}", "yes" if t["ok"] else "**no**",
                         ", ".join(f"{v:.3f}" for v in t["per_seed"]), _seeds_met(t)])
    out = [f"# circuitkd targets: config `{cfg.name}`, seeds {seeds}", "",
           "The models the targets name, trained for these seeds; each target on the mean over seeds (what a "
           "run's banner checks) and on every seed alone.", "",
           _table(["target", "mean", "met on the mean", "per seed", "seeds met alone"], body), ""]
    for line in result["thin_targets"]:
        out += [f"**Thin:** {line}.", ""]
    if not result["targets_met"]:
        out += ["**⚠ Some targets are missed on the mean: a run of this config on these seeds would say its "
                "findings are unreliable.**", ""]
    return "\n".join(out)
