"""The study ``circuitkd run`` performs, after Cheng, Agarwal & Amiri (2025), "Do Students Debias Like
Teachers? On the Distillability of Bias Mitigation Methods" (arXiv 2510.26038).

- :mod:`~circuitkd.run.tasks`: the task registry (generated tasks, real-benchmark loaders, controls);
- :mod:`~circuitkd.run.plan`: configs and the grid of jobs (teachers, students, KD, fixes, controls,
  budget sweep) in dependency order;
- :mod:`~circuitkd.run.jobs`: one job (train or distil, evaluate, write its row);
- :mod:`~circuitkd.run.runner` and :mod:`~circuitkd.run.executors`: the local process pool and Ray;
- :mod:`~circuitkd.run.summary`: the findings with intervals and verdicts, ``summary.md``;
- :mod:`~circuitkd.run.study`: the analysis stage (patching, attention diff, circuits per pair);
- :mod:`~circuitkd.run.arms`, :mod:`~circuitkd.run.report`, :mod:`~circuitkd.run.figures`: the two
  arms side by side, the HTML report and the figure files.

The run folder holds ``config.json``, ``results.json`` / ``results.csv`` (one row per model and
seed), ``summary.md``, ``models/`` (checkpoints; finished models are skipped on a re-run),
``analysis/`` and ``report.html``.
"""
from circuitkd.run.plan import default_config, load_config, plan
from circuitkd.run.runner import run_experiment
from circuitkd.run.summary import render_summary, summarise
from circuitkd.run.tasks import load_task

__all__ = ["default_config", "load_config", "load_task", "plan", "render_summary", "run_experiment", "summarise"]
