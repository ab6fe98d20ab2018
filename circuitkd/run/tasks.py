"""The study's task registry: the generated tasks and the real-benchmark loaders a config names,
built once per process, and each task's control (every shortcut uncorrelated with the label)."""
from __future__ import annotations

import functools
import json
from typing import Optional

from circuitkd.config import ExperimentCfg
from circuitkd.errors import CircuitKDError


TASKS = ("synthetic_nli", "colored_mnist", "shortcut_mnist", "mnli", "hans", "snli", "waterbirds", "celeba")

#: Tasks generated in this package (the others are loaders of real benchmarks, ``data.load_<name>``).
GENERATED = ("synthetic_nli", "colored_mnist", "shortcut_mnist")

TEXT_LOADERS = ("mnli", "hans", "snli")

@functools.lru_cache(maxsize=2)
def _task(name: str, args_json: str):
    from circuitkd import data

    if name not in TASKS:
        raise CircuitKDError(f"unknown task {name!r}; known: {list(TASKS)}")
    args = json.loads(args_json)
    if name in TEXT_LOADERS:
        # Real benchmarks read through a pretrained tokenizer named in the config,
        # e.g. {"path_or_name": "data/mnli", "tokenizer": "bert-base-uncased", "hans": "data/hans"}.
        tok = args.pop("tokenizer", None)
        if tok is None:
            raise CircuitKDError(f"task {name!r} needs task_args.tokenizer (a pretrained name or folder)")
        args["tokenizer"] = _tokenizer(tok)
    task = getattr(data, name if name in GENERATED else f"load_{name}")(**args)
    task.info["source"] = {"task": name, "args": json.loads(args_json)}
    return task


def _tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except OSError as exc:
        raise CircuitKDError(f"cannot load tokenizer {name!r}: {exc}") from exc


def load_task_by_name(name: str, args: Optional[dict] = None):
    """The task ``name`` (see :data:`TASKS`) built with ``args``; cached per process."""
    return _task(name, json.dumps(args or {}, sort_keys=True))


def load_task(cfg: ExperimentCfg, *, control: bool = False):
    """The config's task; with ``control``, the same task with every shortcut uncorrelated with the label."""
    args = control_task_args(cfg) if control else cfg.task_args
    if args is None:
        raise CircuitKDError(f"task {cfg.task!r} has no shortcut strength to switch off: no control task")
    return _task(cfg.task, json.dumps(args, sort_keys=True))


#: The shortcut strength at which a generated task's shortcuts carry no information about the label.
_UNCORRELATED_STRENGTH = {"synthetic_nli": 1 / 3, "colored_mnist": 0.5, "shortcut_mnist": 0.5}

def control_task_args(cfg: ExperimentCfg) -> Optional[dict]:
    """``task_args`` of the control task (None for tasks whose shortcut strength is not a setting)."""
    if cfg.task not in _UNCORRELATED_STRENGTH:
        return None
    return {**cfg.task_args, "strength": _UNCORRELATED_STRENGTH[cfg.task]}

