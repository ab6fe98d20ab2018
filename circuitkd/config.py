"""Frozen configuration dataclasses, saved as JSON beside every result (the nanoGPT habit)."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Sequence

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
}


def _from_dict(cls, data: dict[str, Any]):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise CircuitKDError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}")
    return cls(**data)


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
        if name not in _PRESETS:
            raise CircuitKDError(f"unknown preset {name!r}; expected one of {sorted(_PRESETS)}")
        return cls(**{**_PRESETS[name], **overrides})

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
    reliance depends on it (see DESIGN.md, science notes). Its default is 600, or
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


@dataclass(frozen=True)
class ExperimentCfg(_Jsonable):
    """The distillability grid that ``circuitkd run`` trains and evaluates (see ``circuitkd.experiment``).

    Models are preset names or dicts of :class:`ModelSpec` fields. Every teacher is trained
    plainly and with each of ``methods``; every student is trained alone (plainly and with
    each method), by KD from each teacher at each of ``alphas``, by debiased KD (label loss =
    the teacher's method, ``debiased_kd_alpha``), and with each of ``fixes`` ("augment",
    "iterative", "init") at ``fix_alpha``; all for each of ``seeds``. The training budget
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
    #: keyword arguments of :func:`circuitkd.study.analyse_run` for ``circuitkd run``'s analysis stage
    analysis: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("methods", "seeds", "alphas", "fixes"):
            object.__setattr__(self, name, _tuple(getattr(self, name)))
        unknown_fixes = sorted(set(self.fixes) - {"augment", "iterative", "init"})
        if unknown_fixes:
            raise CircuitKDError(f"unknown fix(es) {unknown_fixes}; known: ['augment', 'init', 'iterative']")
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

    def replace(self, **changes: Any) -> "ExperimentCfg":
        return dataclasses.replace(self, **changes)
