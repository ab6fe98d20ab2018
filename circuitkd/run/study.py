"""The analysis half of the study: patching, attention diffing and circuits on the pairs that matter.

After :func:`circuitkd.run.run_experiment` has trained and evaluated the grid,
:func:`analyse_run` picks the teacher/student pairs the paper's question is about — the
plain teacher and its KD student, each debiased teacher and its KD student, and the
student made with each fix — and for each runs, on the same bias-conflicting inputs:

* head activation patching (:func:`circuitkd.patch`) of the shortcut contrast in both models;
* attention-pattern diffing with head matching and CKA (:func:`circuitkd.diff_attention`);
* circuit discovery (EAP-IG by default) in both models, their faithfulness curves, and the
  teacher-vs-student circuit comparison (:func:`circuitkd.compare_circuits`).

The inputs are the task's shortcut contrast (:meth:`circuitkd.data.Task.shortcut_pairs`):
``clean_answer`` is the gold label and ``corrupt_answer`` the label the flipped shortcut
pushes the corrupt input towards, so the drop of the default logit-difference metric from
clean to corrupt is the model's shortcut sensitivity.

Everything is written under ``<run>/analysis/``: ``analysis.json`` (every number, every
summary line), ``circuits/*.json`` (reloadable circuits) and ``figures/*.json`` (plotly).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from circuitkd.errors import CircuitKDError
from circuitkd.types import PromptPairs

ANALYSIS_DIR = "analysis"


def comparisons(cfg, rows: list[dict], *, seed: Optional[int] = None) -> list[dict[str, str]]:
    """The teacher/student pairs to analyse, by model id, for one seed (the first by default)."""
    seed = cfg.seeds[0] if seed is None else seed
    ids = {r["id"] for r in rows}
    # The KD student at the fixes' alpha, so the plain-KD pairs and the fix pairs compare alike.
    alpha = cfg.fix_alpha if cfg.fix_alpha in cfg.alphas else (min(cfg.alphas) if cfg.alphas else None)
    a = f"{alpha:g}" if alpha is not None else None
    out: list[dict[str, str]] = []

    def add(name: str, teacher: str, student: str, what: str) -> None:
        if teacher in ids and student in ids:
            out.append({"name": name, "teacher": teacher, "student": student, "what": what})

    if a is not None:
        add("plain", f"teacher-none-s{seed}", f"student-kd{a}-none-s{seed}",
            f"plain teacher vs its KD student (α={a})")
        for m in cfg.methods:
            add(m, f"teacher-{m}-s{seed}", f"student-kd{a}-{m}-s{seed}", f"{m} teacher vs its KD student (α={a})")
    if cfg.methods:
        m = cfg.methods[0]
        for fix in cfg.fixes:
            add(f"{m}+{fix}", f"teacher-{m}-s{seed}", f"student-{fix}-{m}-s{seed}",
                f"{m} teacher vs the student distilled with the {fix} fix")
    return out


def _patch_heads(model, pairs: PromptPairs, batch_size: int) -> dict[str, Any]:
    from circuitkd.patching import patch_result

    res = patch_result(model, pairs, site="head", direction="denoise", normalise=False, batch_size=batch_size)
    effect = (res.raw - res.corrupt).float()
    return {"effect": effect.tolist(), "clean": res.clean, "corrupt": res.corrupt,
            "sensitivity": res.clean - res.corrupt, "method": res.method,
            "axes": list(res.axes)}


def analyse_model(model, pairs: PromptPairs, *, circuit_method: str, circuit_kwargs: dict,
                  batch_size: int, top_k: int) -> dict[str, Any]:
    """Head patching, a circuit and its faithfulness for one model on ``pairs``."""
    from circuitkd.circuits import discover, faithfulness

    out: dict[str, Any] = {"patching": _patch_heads(model, pairs, batch_size)}
    t0 = time.perf_counter()
    circuit = discover(model, pairs, method=circuit_method, batch_size=batch_size, **circuit_kwargs)
    n_valid = int(circuit.valid_cells.sum())
    k = min(top_k, n_valid)
    circuit.mask = circuit.top_k_mask(k)
    out["circuit_seconds"] = time.perf_counter() - t0
    out["circuit"] = circuit
    out["circuit_top"] = [(str(e), s) for e, s in circuit.top_edges(k)]
    try:
        out["faithfulness"] = faithfulness(model, pairs, circuit, batch_size=batch_size).to_dict()
    except CircuitKDError as exc:  # e.g. a model the shortcut does not move at all
        out["faithfulness"] = {"error": str(exc)}
    return out


def analyse_pair(run_dir: str | Path, cfg, seed: int, cmp: dict[str, str], *, n_pairs: int, n_attention: int,
                 circuit_method: str, circuit_kwargs: dict, top_k: int, batch_size: int,
                 device: Optional[str] = None, figures: bool = True, cache: Optional[dict] = None,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """One analysis job: one teacher/student pair of a finished run on ``seed``'s shortcut pairs.

    Head patching, a circuit and its faithfulness for each model (:func:`analyse_model`), their
    attention diff and circuit comparison. Returns ``models`` (each model's analysis), ``entry``
    (this seed's numbers for the over-seeds intervals), ``detail`` (the full record, when
    ``figures``, else None) and ``figures``. ``cache`` shares loaded models, pairs and analyses
    between the jobs of one process.
    """
    from circuitkd.attention import diff_attention
    from circuitkd.circuits import compare_circuits
    from circuitkd.circuits.compare import head_matching
    from circuitkd.run.tasks import load_task
    from circuitkd.models import load_checkpoint
    from circuitkd.viz import attention as viz_attention
    from circuitkd.viz import circuits as viz_circuits
    from circuitkd.viz import patching as viz_patching

    cache = {} if cache is None else cache
    models, per_model = cache.setdefault("models", {}), cache.setdefault("per_model", {})
    task = load_task(cfg)
    by_seed = cache.setdefault("pairs", {})
    if seed not in by_seed:
        by_seed[seed] = task.shortcut_pairs(n_pairs, seed=seed)
    seed_pairs = by_seed[seed]

    def get(model_id: str):
        if model_id not in models:
            models[model_id] = load_checkpoint(Path(run_dir) / "models" / model_id, device=device)
        if model_id not in per_model:
            t0 = time.perf_counter()
            per_model[model_id] = analyse_model(models[model_id], seed_pairs, circuit_method=circuit_method,
                                                circuit_kwargs=circuit_kwargs, batch_size=batch_size, top_k=top_k)
            log(f"  {model_id}: patching + {circuit_method} circuit in {time.perf_counter() - t0:.1f}s")
        return models[model_id]

    teacher, student = get(cmp["teacher"]), get(cmp["student"])
    t0 = time.perf_counter()
    diff = diff_attention(teacher, student, task, split="ood_test", n=n_attention, batch_size=64)
    t_res, s_res = per_model[cmp["teacher"]], per_model[cmp["student"]]
    # Heads matched by function (their attention patterns), MLPs by relative depth.
    comparison = compare_circuits(
        t_res["circuit"], s_res["circuit"],
        matching=head_matching(t_res["circuit"], s_res["circuit"], diff.matching),
        matching_name=f"heads by attention pattern ({diff.matching_method}), MLPs by relative depth")
    by_depth = compare_circuits(t_res["circuit"], s_res["circuit"])
    log(f"  attention diff + circuit comparison in {time.perf_counter() - t0:.1f}s")
    name = cmp["name"]
    n_teacher_edges = len(comparison.shared) + len(comparison.lost)
    entry = {
        "seed": seed, "teacher": cmp["teacher"], "student": cmp["student"],
        "teacher_sensitivity": t_res["patching"]["sensitivity"],
        "student_sensitivity": s_res["patching"]["sensitivity"],
        "teacher_shortcut_attention": float(diff.teacher.shortcut_attention().nanmean()),
        "student_shortcut_attention": float(diff.student.shortcut_attention().nanmean()),
        "edge_survival": len(comparison.shared) / n_teacher_edges if n_teacher_edges else float("nan")}
    out: dict[str, Any] = {"models": {cmp["teacher"]: t_res, cmp["student"]: s_res}, "entry": entry,
                           "detail": None, "figures": {}}
    if not figures:
        return out  # later seeds feed the intervals; figures and prose come from the first
    figs = out["figures"]
    figs[f"{name}__attention_heatmaps"] = viz_attention.shortcut_heatmaps(diff)
    figs[f"{name}__patterns"] = viz_attention.pattern_figure(diff)
    figs[f"{name}__matching"] = viz_attention.matching_figure(diff)
    figs[f"{name}__cka"] = viz_attention.cka_figure(diff)
    figs[f"{name}__head_patching"] = viz_patching.head_effects_figure(
        t_res["patching"], s_res["patching"], matching=diff.matching, matching_method=diff.matching_method,
        teacher_name=cmp["teacher"], student_name=cmp["student"])
    figs[f"{name}__circuit"] = viz_circuits.circuit_figure(
        t_res["circuit"], s_res["circuit"], comparison, teacher_name=cmp["teacher"], student_name=cmp["student"],
        title=f"{name}: teacher vs student circuit")
    faith = {k: v for k, v in (("teacher", t_res["faithfulness"]), ("student", s_res["faithfulness"]))
             if "error" not in v}
    if faith:
        figs[f"{name}__faithfulness"] = viz_circuits.faithfulness_curves(
            {k: _Faith(v) for k, v in faith.items()}, title=f"{name}: faithfulness")
    out["detail"] = {
        "teacher_patching": t_res["patching"], "student_patching": s_res["patching"],
        "attention": diff.to_dict(), "attention_summary": diff.summary(),
        "circuit_comparison": comparison.to_dict(),
        "teacher_circuit_top": t_res["circuit_top"], "student_circuit_top": s_res["circuit_top"],
        "teacher_faithfulness": t_res["faithfulness"], "student_faithfulness": s_res["faithfulness"],
        "circuit_comparison_by_depth": by_depth.to_dict(),
        **_findings_and_figures(cmp, t_res, s_res, diff, comparison, by_depth),
    }
    return out


def load_finished_run(run_dir: str | Path) -> tuple[dict[str, Any], Any, Any]:
    """``(results.json's dict, its ExperimentCfg, the task rebuilt from it)`` of a finished run folder."""
    from circuitkd.config import ExperimentCfg
    from circuitkd.run.tasks import load_task

    results_path = Path(run_dir) / "results.json"
    if not results_path.exists():
        raise CircuitKDError(f"{run_dir} is not a finished run folder (no results.json)")
    results = json.loads(results_path.read_text())
    cfg = ExperimentCfg.from_dict(results["config"])
    return results, cfg, load_task(cfg)


def analyse_run(run_dir: str | Path, *, n_pairs: int = 96, n_attention: int = 256,
                circuit_method: str = "eap-ig", circuit_kwargs: Optional[dict] = None, top_k: int = 20,
                batch_size: int = 32, seed: Optional[int] = None, device: Optional[str] = None,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """Analyse the teacher/student pairs of a finished run; writes ``<run>/analysis/`` and returns its dict.

    Each pair of each seed is one :func:`analyse_pair` job: in this process one after another
    (models shared between pairs are analysed once), or as Ray tasks when the run's config says
    ``executor: "ray"`` (see :mod:`circuitkd.run.executors`).
    """
    from circuitkd.models.checkpoint import atomic_write_dir

    run_dir = Path(run_dir)
    results, cfg, task = load_finished_run(run_dir)
    rows = results["results"]
    by_id = {r["id"]: r for r in rows}
    seeds = [seed] if seed is not None else list(cfg.seeds)
    todo = [(s, cmp) for s in seeds for cmp in comparisons(cfg, rows, seed=s)]
    if not todo:
        raise CircuitKDError(f"run {run_dir} has no teacher/student pair to analyse")
    pairs = task.shortcut_pairs(n_pairs, seed=seeds[0])
    circuit_kwargs = dict(circuit_kwargs if circuit_kwargs is not None else
                          ({"steps": 8} if circuit_method == "eap-ig" else {}))
    settings = dict(n_pairs=n_pairs, n_attention=n_attention, circuit_method=circuit_method,
                    circuit_kwargs=circuit_kwargs, top_k=top_k, batch_size=batch_size, device=device)
    t_start = time.perf_counter()
    if cfg.executor == "ray":
        # One Ray task per pair; each analyses its own teacher and student (a teacher shared by
        # two pairs is analysed twice, in parallel, with the same result).
        from circuitkd.run.executors import RemoteJob, ray_cluster, run_remote

        jobs = [RemoteJob(f"analysis-{cmp['name']}-s{s}", analyse_pair, (str(run_dir), cfg, s, cmp),
                          {**settings, "figures": s == seeds[0]}) for s, cmp in todo]
        with ray_cluster(cfg):
            done = run_remote(jobs, cfg, run_dir, what="analysis jobs", num_gpus=min(cfg.gpus_per_job, 1.0))
        results = [done[job.id] for job in jobs]
    else:
        cache: dict[str, Any] = {"pairs": {seeds[0]: pairs}}  # models and analyses shared by the pairs
        results = []
        for i, (s, cmp) in enumerate(todo, 1):
            log(f"[analysis {i}/{len(todo)}] seed {s}, {cmp['what']}: {cmp['teacher']} vs {cmp['student']}")
            results.append(analyse_pair(run_dir, cfg, s, cmp, figures=s == seeds[0], cache=cache, log=log,
                                        **settings))

    per_model: dict[str, dict] = {}
    figures: dict[str, Any] = {}
    out_pairs = []
    per_seed: dict[str, list[dict[str, Any]]] = {}
    for (s, cmp), res in zip(todo, results):
        for model_id, model_res in res["models"].items():
            per_model.setdefault(model_id, model_res)
        per_seed.setdefault(cmp["name"], []).append(res["entry"])
        figures.update(res["figures"])
        if res["detail"] is not None:
            out_pairs.append({**cmp, "teacher_scores": _scores(by_id[cmp["teacher"]]),
                              "student_scores": _scores(by_id[cmp["student"]]), **res["detail"]})

    over_seeds = mechanism_over_seeds(per_seed)
    analysis = {
        "run": str(run_dir), "pairs_kind": pairs.meta, "n_pairs": len(pairs), "n_attention": n_attention,
        "circuit_method": circuit_method, "circuit_kwargs": circuit_kwargs, "top_k": top_k,
        "seeds": seeds, "comparisons": out_pairs, "per_seed": per_seed, "over_seeds": over_seeds,
        "mechanism_finding": mechanism_finding(cfg, over_seeds), "seconds": time.perf_counter() - t_start,
    }

    def write(tmp: Path) -> None:
        (tmp / "circuits").mkdir()
        (tmp / "figures").mkdir()
        for model_id, res in per_model.items():
            res["circuit"].to_json(tmp / "circuits" / f"{model_id}.json")
        for key, fig in figures.items():
            (tmp / "figures" / f"{key}.json").write_text(fig.to_json())
        (tmp / "analysis.json").write_text(json.dumps(analysis, indent=1, default=_jsonable))

    atomic_write_dir(run_dir / ANALYSIS_DIR, write)
    from circuitkd.run.runner import add_mechanism_finding

    add_mechanism_finding(run_dir, analysis["mechanism_finding"])
    log(f"analysis written to {run_dir / ANALYSIS_DIR} ({analysis['seconds']:.0f}s)")
    return analysis


def mechanism_over_seeds(per_seed: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per comparison: student − teacher shortcut sensitivity and shortcut attention, and the
    fraction of the teacher's top edges the student keeps, each as a mean with a 95% t-interval over seeds."""
    from circuitkd.stats import seed_interval

    out: dict[str, dict[str, Any]] = {}
    for name, entries in per_seed.items():
        out[name] = {
            "n_seeds": len(entries),
            "sensitivity_diff": seed_interval([e["student_sensitivity"] - e["teacher_sensitivity"]
                                               for e in entries]).to_dict(),
            "shortcut_attention_diff": seed_interval([e["student_shortcut_attention"] - e["teacher_shortcut_attention"]
                                                      for e in entries]).to_dict(),
            "edge_survival": seed_interval([e["edge_survival"] for e in entries]).to_dict(),
        }
    return out


def mechanism_finding(cfg, over_seeds: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The paper's fourth finding, by code: for each debiased teacher and its KD student, the student is
    more shortcut-sensitive (patching) and its heads attend more to shortcut tokens (attention diff)."""
    from circuitkd.stats import Interval, combine, verdict

    per_method = {}
    for m in cfg.methods:
        if m not in over_seeds:
            continue
        d = over_seeds[m]
        sens = verdict(Interval(**d["sensitivity_diff"]))
        attn = verdict(Interval(**d["shortcut_attention_diff"]))
        per_method[m] = {"verdict": combine([sens, attn]), "sensitivity": sens, "attention": attn,
                         "sensitivity_diff": d["sensitivity_diff"], "attention_diff": d["shortcut_attention_diff"],
                         "edge_survival": d["edge_survival"]}
    return {"id": "mechanism", "title": "The student's shortcut use shows in its attention and circuit",
            "test": "student − teacher shortcut sensitivity (logit-diff drop when the shortcut flips) > 0 and "
                    "student − teacher read-out attention to shortcut tokens > 0 (95% t-intervals over seeds)",
            "verdict": combine([d["verdict"] for d in per_method.values()]), "per_method": per_method}


class _Faith:
    """Attribute view of a faithfulness dict, for the figure builder."""

    def __init__(self, d: dict):
        self.__dict__.update(d)


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, float) and value != value:
        return None
    return str(value)


def _scores(row: dict) -> dict[str, Any]:
    keys = [k for k in row if k in ("id_acc", "ood_acc", "worst_group_acc") or k.startswith("ood_acc[")]
    return {k: row[k] for k in keys}


def _top_head(effect: list) -> tuple[str, float]:
    t = torch.tensor(effect)
    flat = int(t.abs().argmax())
    layer, head = divmod(flat, t.shape[1])
    return f"{layer}.{head}", float(t[layer, head])


def findings(cmp: dict, t_res: dict, s_res: dict, diff, comparison, by_depth=None) -> list[str]:
    """One line per finding, in words, with the numbers behind it."""
    return _findings_and_figures(cmp, t_res, s_res, diff, comparison, by_depth)["findings"]


def _findings_and_figures(cmp: dict, t_res: dict, s_res: dict, diff, comparison, by_depth=None) -> dict[str, list]:
    """``findings`` (one line each) and ``finding_figures``: the figure kind that shows each line
    (``<name>__<kind>.json``), None where no figure does; the report links the two."""
    from circuitkd.viz.attention import choose_pair

    lines: list[tuple[str, Optional[str]]] = []
    t_sens, s_sens = t_res["patching"]["sensitivity"], s_res["patching"]["sensitivity"]
    more = "more" if s_sens > t_sens else "less"
    lines.append((f"Flipping the shortcut lowers logit(gold) − logit(shortcut's label) by {t_sens:.2f} in the teacher "
                  f"and {s_sens:.2f} in the student: the student is {more} shortcut-sensitive.", "head_patching"))
    th, tv = _top_head(t_res["patching"]["effect"])
    sh, sv = _top_head(s_res["patching"]["effect"])
    lines.append((f"Patching the clean head output into the shortcut-flipped run restores most at teacher head {th} "
                  f"({tv:+.2f}) and student head {sh} ({sv:+.2f}).", "head_patching"))
    ts, ss = diff.teacher.shortcut_attention(), diff.student.shortcut_attention()
    t_mean, s_mean = float(ts.nanmean()), float(ss.nanmean())
    lines.append((f"Attention from the read-out position to shortcut tokens averages {t_mean:.3f} per teacher head and "
                  f"{s_mean:.3f} per student head ({'higher' if s_mean > t_mean else 'lower'} in the student; "
                  f"heads matched {diff.matching_method}).", "attention_heatmaps"))
    ex = diff.example
    if ex is not None and diff.matching and ex.shortcut_positions:
        t_head, s_head, _ = choose_pair(diff)
        t_mass, s_mass = ex.readout_mass("teacher", t_head), ex.readout_mass("student", s_head)
        lines.append((f"On bias-conflicting example {ex.index}, student head {s_head[0]}.{s_head[1]} puts {s_mass:.2f} of "
                      f"its read-out attention on shortcut tokens and its matched teacher head {t_head[0]}.{t_head[1]} "
                      f"{t_mass:.2f} (the matched pair whose shortcut attention changed most).", "patterns"))
    lines.extend((v, "circuit") for v in comparison.verdicts)
    if by_depth is not None:
        n_t = len(by_depth.shared) + len(by_depth.lost)
        lines.append((f"Matched by relative depth instead (heads keep their index, which means little for a "
                      f"student not initialised from the teacher), {len(by_depth.shared)}/{n_t} teacher edges survive.",
                      None))
    for who, res in (("teacher", t_res), ("student", s_res)):
        f = res["faithfulness"]
        if "error" not in f:
            lines.append((f"The {who}'s top-{len(res['circuit_top'])} edge circuit recovers {100 * f['recovered']:.0f}% "
                          f"of its shortcut-contrast metric (CPR {f['cpr']:.2f}, CMD {f['cmd']:.2f}).", "faithfulness"))
    return {"findings": [line for line, _ in lines], "finding_figures": [kind for _, kind in lines]}
