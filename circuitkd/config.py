"""Frozen configuration dataclasses, saved as JSON beside every result (the nanoGPT habit)."""
from __future__ import annotations

import collections.abc
import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from circuitkd.errors import CircuitKDError

BACKBONES = ("native", "bert", "vit")

# Size presets. The student keeps the teacher's width and head count so that the
# "initialise from teacher" fix (every other layer, as DistilBERT did) applies.
_PRESETS: dict[str, dict[str, Any]] = {
    "teacher": dict(backbone="native", n_layers=4, d_model=128, n_heads=4),
    "assistant": dict(backbone="native", n_layers=3, d_model=128, n_heads=4),
    "student": dict(backbone="native", n_layers=2, d_model=128, n_heads=4),
    "tiny": dict(backbone="native", n_layers=1, d_model=32, n_heads=2),
    "bert-teacher": dict(backbone="bert", n_layers=4, d_model=128, n_heads=4),
    "bert-student": dict(backbone="bert", n_layers=2, d_model=128, n_heads=4),
    "vit-teacher": dict(backbone="vit", n_layers=4, d_model=64, n_heads=4),
    "vit-student": dict(backbone="vit", n_layers=2, d_model=64, n_heads=4),
    # BERT-base sizes (random init unless ``pretrained`` is set): GPU benchmarks (benchmarks/gpu.sh).
    "base": dict(backbone="native", n_layers=12, d_model=768, n_heads=12, d_mlp=3072),
    "bert-base": dict(backbone="bert", n_layers=12, d_model=768, n_heads=12, d_mlp=3072),
}


def _from_dict(cls, data: dict[str, Any]):
    if not isinstance(data, dict):
        raise CircuitKDError(f"{cls.__name__} must be built from a mapping of its fields, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise CircuitKDError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}")
    _validate_values(cls, data)  # before __init__, whose own type checks (if any) are not one-line errors
    return cls(**data)


# ------------------------------------------------------------- field validation
#
# Every field is checked against its annotation (int, float, bool, str, Optional[...], dict,
# Sequence); ``_RULES`` adds ranges and names, per class and field. A new field gets its
# type check for free and a range by adding one row here.

Rule = tuple[str, Callable[[Any], bool]]


def _at_least(lo: Union[int, float]) -> Rule:
    return f">= {lo}", lambda v: v >= lo


def _in(lo: Union[int, float], hi: Union[int, float], *, lo_open: bool = False, hi_open: bool = False) -> Rule:
    text = f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    return text, lambda v: (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)


_POSITIVE: Rule = ("> 0", lambda v: v > 0)
_NON_NEGATIVE = _at_least(0)
_AT_LEAST_1 = _at_least(1)


def _optional(rule: Rule) -> Rule:
    return rule[0], lambda v: v is None or rule[1](v)


def _each(rule: Rule, kind: type) -> Rule:
    def ok(values):
        return all(isinstance(v, kind) and not isinstance(v, bool) and rule[1](v) for v in values)
    return f"a list of {kind.__name__}s each {rule[0]}", ok


#: Where ``circuitkd run`` runs its jobs (see :mod:`circuitkd.run.executors`).
EXECUTORS = ("local", "ray")
#: ExperimentCfg fields that say where a run's jobs execute, not what they compute: a run folder
#: started under one executor, or with another number of local worker processes, resumes under another.
EXECUTION_FIELDS = ("executor", "ray_address", "cpus_per_job", "gpus_per_job", "job_retries", "workers")


def _ray_address_ok(value: str) -> bool:
    if value in ("", "auto"):
        return True
    host, sep, port = value.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def _device_ok(value: str) -> bool:
    if value == "auto":
        return True
    import torch

    try:
        torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


_RULES: dict[str, dict[str, Rule]] = {
    "ModelSpec": {
        "d_mlp": _optional(_AT_LEAST_1), "n_ctx": _optional(_AT_LEAST_1), "d_vocab": _optional(_AT_LEAST_1),
        "n_classes": _optional(_AT_LEAST_1), "image_size": _AT_LEAST_1, "patch_size": _AT_LEAST_1,
        "n_channels": _AT_LEAST_1, "dropout": _in(0, 1, hi_open=True), "seed": _NON_NEGATIVE,
    },
    "TrainCfg": {
        "steps": _AT_LEAST_1, "batch_size": _AT_LEAST_1, "lr": _POSITIVE, "weight_decay": _NON_NEGATIVE,
        "warmup_frac": _in(0, 1, hi_open=True), "grad_clip": _NON_NEGATIVE, "seed": _NON_NEGATIVE,
        "checkpoint_every": _NON_NEGATIVE, "eval_every": _NON_NEGATIVE,
    },
    "DebiasCfg": {
        "bias": ("a non-empty name", bool), "focal_gamma": _NON_NEGATIVE, "lmh_entropy_weight": _NON_NEGATIVE,
        "dro_eta": _POSITIVE, "dro_adjustment": _NON_NEGATIVE, "jtt_upweight": _at_least(1),
        "jtt_id_frac": _in(0, 1, lo_open=True), "unknown_examples": _AT_LEAST_1, "unknown_steps": _AT_LEAST_1,
        "bias_model_l2": _NON_NEGATIVE,
    },
    "ExperimentCfg": {
        "name": ("a non-empty name", bool),
        "seeds": _each(_NON_NEGATIVE, int), "alphas": _each(_in(0, 1), float),
        "methods": ("a list of method names", lambda v: all(isinstance(m, str) for m in v)),
        "fixes": ("a list of fix names", lambda v: all(isinstance(m, str) for m in v)),
        "teacher_steps": _AT_LEAST_1, "student_steps": _AT_LEAST_1, "batch_size": _AT_LEAST_1,
        "lr": _POSITIVE, "weight_decay": _NON_NEGATIVE, "temperature": _POSITIVE,
        "debiased_kd_alpha": _in(0, 1), "fix_alpha": _in(0, 1), "augment_n": _NON_NEGATIVE,
        "workers": _AT_LEAST_1, "threads_per_worker": _AT_LEAST_1,
        "device": ("'auto' or a torch device ('cpu', 'cuda', 'cuda:1')", _device_ok),
        "executor": (f"one of {list(EXECUTORS)}", lambda v: v in EXECUTORS),
        "ray_address": ("'' (RAY_ADDRESS or a new local Ray), 'auto' or 'HOST:PORT'", _ray_address_ok),
        "cpus_per_job": _AT_LEAST_1, "job_retries": _NON_NEGATIVE,
        "gpus_per_job": ("a GPU count >= 0: a fraction up to 1 (jobs share a GPU), a whole number above",
                         lambda v: v >= 0 and (v <= 1 or float(v).is_integer())),
        "student_budgets": _each(_AT_LEAST_1, int), "budget_alpha": _in(0, 1), "n_boot": _at_least(100),
        "targets": ("a mapping of target names to numbers in [0, 1]",
                    lambda v: all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x <= 1
                                  for x in v.values())),
    },
}


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if hint in (Sequence, list, tuple) or typing.get_origin(hint) in (collections.abc.Sequence, list, tuple):
        return "a list"
    return getattr(hint, "__name__", str(hint))


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin is Union:
        return any(_matches(value, a) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    if hint in (Sequence, list, tuple) or origin in (collections.abc.Sequence, list, tuple):
        return isinstance(value, (list, tuple))
    try:
        return isinstance(value, origin or hint)
    except TypeError:
        return True


def validate_fields(cfg: Any) -> None:
    """Check every field of the config dataclass ``cfg`` against its annotation and :data:`_RULES`."""
    _validate_values(type(cfg), {f.name: getattr(cfg, f.name) for f in fields(cfg)})


def _validate_values(cls: type, values: dict[str, Any]) -> None:
    hints = typing.get_type_hints(cls)
    rules = _RULES.get(cls.__name__, {})
    for name, value in values.items():
        hint = hints.get(name, Any)
        if not _matches(value, hint):
            finite = " (finite)" if float in (hint, *typing.get_args(hint)) else ""
            raise CircuitKDError(f"{cls.__name__}.{name} must be {_type_name(hint)}{finite}, got {value!r}")
        rule = rules.get(name)
        if rule is not None and value is not None and not rule[1](value):
            raise CircuitKDError(f"{cls.__name__}.{name} must be {rule[0]}, got {value!r}")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a JSON, TOML or YAML config file (chosen by the suffix)."""
    path = Path(path)
    if not path.is_file():
        raise CircuitKDError(f"config file not found: {path}")
    text = path.read_text()
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise CircuitKDError(f"config file {path} must end in .json, .toml, .yaml or .yml")
    except CircuitKDError:
        raise
    except Exception as exc:  # the parsers' own error types differ
        raise CircuitKDError(f"cannot parse config file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise CircuitKDError(f"config file {path} must hold a mapping of settings, got {type(data).__name__}")
    return data


class _Jsonable:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[arg-type]

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        return _from_dict(cls, dict(data))

    @classmethod
    def from_file(cls, path: str | Path):
        """Load from a ``.json``, ``.toml`` or ``.yaml``/``.yml`` file."""
        return cls.from_dict(read_config_file(path))

    @classmethod
    def from_json(cls, path_or_text: str | Path):
        p = Path(path_or_text) if not str(path_or_text).lstrip().startswith("{") else None
        if p is not None and not p.exists():
            raise CircuitKDError(f"config file not found: {p}")
        return cls.from_dict(json.loads(p.read_text() if p is not None else str(path_or_text)))


@dataclass(frozen=True)
class ModelSpec(_Jsonable):
    """What model to build.

    ``backbone``: "native" (TransformerLens-native encoder, default for text), "bert"
    (HF ``BertForSequenceClassification``) or "vit" (HF ``ViTForImageClassification``).
    ``n_classes``, ``d_vocab`` and ``n_ctx`` are filled from the task when left None.
    ``pretrained``: a hub name or local folder for HF backbones (weights loaded, sizes read from it).
    ``causal``: build a causal (decoder) native model whose logits are read per position.
    """

    backbone: str = "native"
    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 4
    d_mlp: Optional[int] = None
    n_ctx: Optional[int] = None
    d_vocab: Optional[int] = None
    n_classes: Optional[int] = None
    act_fn: str = "gelu"
    causal: bool = False
    attn_only: bool = False
    pretrained: Optional[str] = None
    image_size: int = 28
    patch_size: int = 7
    n_channels: int = 3
    dropout: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        validate_fields(self)
        if self.backbone not in BACKBONES:
            raise CircuitKDError(f"unknown backbone {self.backbone!r}; expected one of {BACKBONES}")
        if self.pretrained is None:
            if self.n_layers < 1 or self.d_model < 1 or self.n_heads < 1:
                raise CircuitKDError(
                    f"ModelSpec needs positive sizes, got n_layers={self.n_layers}, "
                    f"d_model={self.d_model}, n_heads={self.n_heads}"
                )
            if self.d_model % self.n_heads:
                raise CircuitKDError(
                    f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}"
                )
        if self.backbone == "vit" and self.image_size % self.patch_size:
            raise CircuitKDError(
                f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}"
            )

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelSpec":
        """A named size preset ("teacher", "student", "assistant", "tiny", "bert-*", "vit-*")."""
        if not isinstance(name, str) or name not in _PRESETS:
            raise CircuitKDError(f"unknown preset {name!r}; expected one of {sorted(_PRESETS)}")
        return cls.from_dict({**_PRESETS[name], **overrides})

    @staticmethod
    def presets() -> list[str]:
        return sorted(_PRESETS)

    def replace(self, **changes: Any) -> "ModelSpec":
        return dataclasses.replace(self, **changes)


#: ``CIRCUITKD_SMOKE=1`` makes ``TrainCfg()``'s default budget ``SMOKE_STEPS`` steps instead of 600.
SMOKE_ENV = "CIRCUITKD_SMOKE"
SMOKE_STEPS = 4


@dataclass(frozen=True)
class TrainCfg(_Jsonable):
    """How to train: AdamW with linear warm-up then linear decay, on the model's device.

    ``steps`` is the training budget; it is recorded with every result because shortcut
    reliance depends on it (see docs/architecture.md). Its default is 600, or
    ``SMOKE_STEPS`` when the environment sets ``CIRCUITKD_SMOKE=1`` (a smoke run of code
    written against the defaults, such as the README's example in its test).
    """

    steps: int = field(default_factory=lambda: SMOKE_STEPS if os.environ.get(SMOKE_ENV, "0") != "0" else 600)
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_frac: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 0
    eval_every: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        validate_fields(self)
        if self.steps < 1 or self.batch_size < 1:
            raise CircuitKDError(f"TrainCfg needs steps>=1 and batch_size>=1, got {self.steps}, {self.batch_size}")
        if not 0 <= self.warmup_frac < 1:
            raise CircuitKDError(f"warmup_frac must be in [0, 1), got {self.warmup_frac}")

    def replace(self, **changes: Any) -> "TrainCfg":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class DebiasCfg(_Jsonable):
    """Hyper-parameters of the debiasing methods (``circuitkd.train.debias``).

    ``bias`` picks the bias-only model the bias-product methods use: "all" (one logistic
    model over every annotated shortcut), a single bias type ("overlap", "negation", "cue",
    "color"), or "unknown" (a shallow, briefly trained model, Utama et al. 2020b). A method
    name may override it: ``"poe:unknown"``, ``"reweight:overlap"``.
    """

    bias: str = "all"
    focal_gamma: float = 2.0
    lmh_entropy_weight: float = 0.03
    dro_eta: float = 0.01
    dro_adjustment: float = 0.0
    jtt_upweight: float = 6.0
    jtt_id_frac: float = 0.25
    unknown_examples: int = 500
    unknown_steps: int = 100
    bias_model_l2: float = 1e-3

    def __post_init__(self) -> None:
        validate_fields(self)
        if self.focal_gamma < 0:
            raise CircuitKDError(f"focal_gamma must be >= 0, got {self.focal_gamma}")
        if self.jtt_upweight < 1:
            raise CircuitKDError(f"jtt_upweight must be >= 1, got {self.jtt_upweight}")
        if not 0 < self.jtt_id_frac <= 1:
            raise CircuitKDError(f"jtt_id_frac must be in (0, 1], got {self.jtt_id_frac}")

    def replace(self, **changes: Any) -> "DebiasCfg":
        return dataclasses.replace(self, **changes)


def _tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


#: The fixes a study can apply to KD from a debiased teacher: the paper's three (augmentation data,
#: iterative KD via an assistant, initialisation from teacher layers) and attention transfer on
#: depth-matched heads, on every head or only on the heads of the teacher's shortcut circuit.
FIXES = ("augment", "iterative", "init", "attention", "attention_circuit")

#: What a run's models must reach for its findings to count (means over seeds): the learnability
#: control (teacher on uncorrelated data), the capacity control (student alone on it), the plain
#: teacher (learns the task and leans on the shortcuts), and the debiased teachers (at least
#: ``debiased_min_methods`` of them learn the task and gain OOD accuracy over the plain teacher).
DEFAULT_TARGETS: dict[str, float] = {
    "control_teacher_id": 0.95, "control_teacher_ood": 0.90,
    "control_student_id": 0.90, "control_student_ood": 0.90,
    "plain_teacher_id": 0.95, "plain_teacher_ood_max": 0.70,
    "debiased_teacher_id": 0.90, "debiased_teacher_ood_gain": 0.20,
}


@dataclass(frozen=True)
class ExperimentCfg(_Jsonable):
    """The distillability grid that ``circuitkd run`` trains and evaluates (see ``circuitkd.run``).

    Models are preset names or dicts of :class:`ModelSpec` fields. Every teacher is trained
    plainly and with each of ``methods``; every student is trained alone (plainly and with
    each method), by KD from each teacher at each of ``alphas``, by debiased KD (label loss =
    the teacher's method, ``debiased_kd_alpha``), and with each of ``fixes`` (see
    :data:`FIXES`) at ``fix_alpha``; all for each of ``seeds``. The training budget
    (``teacher_steps``, ``student_steps``, ``batch_size``) is saved with every result.
    """

    name: str = "default"
    task: str = "synthetic_nli"
    task_args: dict = field(default_factory=dict)
    teacher: Any = "teacher"
    student: Any = "student"
    assistant: Any = "assistant"
    methods: Sequence = ("reweight", "poe", "focal", "confreg")  # lists from JSON become tuples
    seeds: Sequence = (0, 1)  # lists from JSON become tuples
    teacher_steps: int = 300
    student_steps: int = 250
    batch_size: int = 64
    lr: float = 1e-3
    #: AdamW's decoupled weight decay for every model of the grid (``TrainCfg.weight_decay``)
    weight_decay: float = 0.01
    temperature: float = 2.0
    alphas: Sequence = (0.0, 0.5)  # lists from JSON become tuples
    debiased_kd_alpha: float = 0.5
    fixes: Sequence = ("augment", "iterative", "init")  # lists from JSON become tuples
    fix_alpha: float = 0.5
    augment_n: int = 1500
    debias: dict = field(default_factory=dict)
    workers: int = 2
    threads_per_worker: int = 1
    device: str = "auto"
    #: "local": ``workers`` processes on this machine; "ray": one Ray task per job, each given
    #: ``cpus_per_job`` CPUs (its torch threads) and ``gpus_per_job`` GPUs (above 1: the job runs
    #: under torchrun DDP, one process per GPU), retried ``job_retries`` times when its worker dies,
    #: on the cluster at ``ray_address`` ("" = ``RAY_ADDRESS`` or a new local Ray, "auto", "HOST:PORT")
    executor: str = "local"
    ray_address: str = ""
    cpus_per_job: int = 1
    gpus_per_job: float = 0.0
    job_retries: int = 3
    #: keyword arguments of :func:`circuitkd.run.study.analyse_run` for ``circuitkd run``'s analysis stage
    analysis: dict = field(default_factory=dict)
    #: train the learnability control (teacher) and capacity control (student) on the task with
    #: every shortcut uncorrelated with the label, beside the grid
    controls: bool = True
    #: extra student budgets (steps) for the budget sweep: KD at ``budget_alpha`` from the plain
    #: teacher and from the ``budget_method`` teacher (default: the first of ``methods``)
    student_budgets: Sequence = ()  # lists from JSON become tuples
    budget_method: str = ""
    budget_alpha: float = 0.0
    #: overrides of :data:`DEFAULT_TARGETS`, the accuracy targets a run's models must reach
    targets: dict = field(default_factory=dict)
    #: bootstrap resamples per interval
    n_boot: int = 2000

    def __post_init__(self) -> None:
        for name in ("methods", "seeds", "alphas", "fixes", "student_budgets"):
            object.__setattr__(self, name, _tuple(getattr(self, name)))
        validate_fields(self)
        unknown_fixes = sorted(set(self.fixes) - set(FIXES))
        if unknown_fixes:
            raise CircuitKDError(f"unknown fix(es) {unknown_fixes}; known: {sorted(FIXES)}")
        if "none" in self.methods:
            raise CircuitKDError("methods lists the debiasing methods; the plain ('none') models are always trained")
        if not self.seeds:
            raise CircuitKDError("ExperimentCfg needs at least one seed")
        if self.teacher_steps < 1 or self.student_steps < 1 or self.batch_size < 1:
            raise CircuitKDError("teacher_steps, student_steps and batch_size must be positive")
        for a in (*self.alphas, self.debiased_kd_alpha, self.fix_alpha):
            if not 0 <= a <= 1:
                raise CircuitKDError(f"KD weights (alpha) must be in [0, 1], got {a}")
        if self.workers < 1 or self.threads_per_worker < 1:
            raise CircuitKDError(f"workers and threads_per_worker must be >= 1, got {self.workers}, {self.threads_per_worker}")
        DebiasCfg.from_dict(self.debias)
        unknown_targets = sorted(set(self.targets) - set(DEFAULT_TARGETS))
        if unknown_targets:
            raise CircuitKDError(f"unknown target(s) {unknown_targets}; known: {sorted(DEFAULT_TARGETS)}")
        if self.budget_method and self.budget_method not in self.methods:
            raise CircuitKDError(f"budget_method {self.budget_method!r} is not one of methods {list(self.methods)}")
        for role in ("teacher", "student", "assistant"):
            self.model_spec(role)
        _check_names(self)

    def model_spec(self, role: str) -> ModelSpec:
        """The :class:`ModelSpec` for "teacher", "student" or "assistant"."""
        value = getattr(self, role)
        if isinstance(value, str):
            return ModelSpec.preset(value)
        if isinstance(value, dict):
            if "preset" in value:
                rest = {k: v for k, v in value.items() if k != "preset"}
                return ModelSpec.preset(value["preset"], **rest)
            return ModelSpec.from_dict(value)
        if isinstance(value, ModelSpec):
            return value
        raise CircuitKDError(f"{role} must be a preset name or a dict of ModelSpec fields, got {value!r}")

    @property
    def sweep_method(self) -> Optional[str]:
        """The debiased teacher the budget sweep distils from (None when there is no method)."""
        return self.budget_method or (self.methods[0] if self.methods else None)

    def target(self, name: str) -> float:
        return float(self.targets.get(name, DEFAULT_TARGETS[name]))

    def replace(self, **changes: Any) -> "ExperimentCfg":
        return dataclasses.replace(self, **changes)


def _check_names(cfg: ExperimentCfg) -> None:
    """Method, task, task_args and analysis names, checked when the config is built (not after training)."""
    import inspect

    from circuitkd.train.debias import METHODS

    for name in cfg.methods:
        base, _, bias = name.partition(":")
        if base not in METHODS:
            raise CircuitKDError(f"unknown debiasing method {name!r} in ExperimentCfg.methods; "
                                 f"known: {sorted(METHODS)}")
        if bias and not METHODS[base].uses_bias_model:
            raise CircuitKDError(f"method {base!r} uses no bias-only model, so {name!r} names one it cannot use")
    from circuitkd.run import tasks

    if cfg.task not in tasks.TASKS:
        raise CircuitKDError(f"unknown task {cfg.task!r}; known: {list(tasks.TASKS)}")

    def keys_of(fn, what: str, given: dict, skip: tuple[str, ...] = ()) -> None:
        params = inspect.signature(fn).parameters
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return
        known = {n for n, p in params.items() if p.kind is not p.VAR_POSITIONAL} - set(skip)
        unknown = sorted(set(given) - known)
        if unknown:
            raise CircuitKDError(f"unknown {what} key(s) {unknown}; known: {sorted(known)}")

    from circuitkd import data

    loader = getattr(data, f"load_{cfg.task}" if cfg.task not in tasks.GENERATED else cfg.task, None)
    if loader is not None:
        extra = ("tokenizer",) if cfg.task in tasks.TEXT_LOADERS else ()
        args = {k: v for k, v in cfg.task_args.items() if k not in extra}
        keys_of(loader, f"task_args (task {cfg.task!r})", args)
    from circuitkd.run.study import analyse_run

    keys_of(analyse_run, "analysis", cfg.analysis, skip=("run_dir", "log"))
