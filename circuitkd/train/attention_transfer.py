"""Attention-transfer distillation on matched heads: a fourth fix for debiasing under KD, guided by the mechanism.

Cheng, Agarwal & Amiri (2025, arXiv 2510.26038) trace a student's lost robustness to its
attention patterns and circuits; :func:`circuitkd.attention.diff_attention` finds, per
teacher/student pair, the student heads that attend to shortcut tokens more than their
matched teacher heads. This fix closes the loop: besides the KD loss, each student head is
trained to attend where its matched teacher head attends,

    L_att = mean over matched (student head s, teacher head t) and attended rows q of
            KL(A_t[q, :] ‖ A_s[q, :])

weighted by a coefficient. It follows the attention-distillation line of work: TinyBERT
(Jiao et al. 2020, "TinyBERT: Distilling BERT for Natural Language Understanding", arXiv
1909.10351) matches attention matrices of mapped layers; MiniLM (Wang et al. 2020, "MiniLM:
Deep Self-Attention Distillation for Task-Agnostic Compression of Pre-Trained Transformers",
arXiv 2002.10957) uses exactly this KL between teacher and student attention distributions.
Unlike either, the heads are paired by a matching, which can be the one
:func:`~circuitkd.attention.diff_attention` produces (Hungarian by pattern), and the transfer can
be restricted to chosen heads — the shortcut heads the analysis flags, or (the circuit-guided
variant) the heads on the teacher's discovered circuit for shortcut-conflict pairs
(``ckd.discover(teacher, task.shortcut_pairs(n), method="eap-ig", top_k=k)``), so the student is
taught the teacher's path rather than every head.

Defaults, and why:

* ``positions="all"``: every real destination row, as MiniLM and TinyBERT do. In an encoder
  the read-out position gathers from every position of the layer below, so matching only the
  read-out row (``"read"``) leaves an indirect route open — a non-read position attends to the
  shortcut token and the read-out then attends to it — and gives P times less signal per example.
* ``coef=1.0``: the KL is in nats and averaged over heads and rows, so it does not grow with
  the number of heads or positions and sits on the scale of the ``T² · KL`` KD term (MiniLM
  weighs its attention KL by 1 as well).
* ``matching="depth"``: needs no trained student. Student heads are assigned one-to-one to the
  target teacher heads minimising the distance in relative depth (``layer / n_layers``, then
  ``head / n_heads``), so with equal head counts student layer ``l`` takes teacher layer
  ``layer_map[l]``, head for head — the layer each student layer starts from under
  ``init_from_teacher`` — and a restricted set of teacher heads (a circuit) is always served by
  the nearest free student heads.

Patterns come from :func:`circuitkd.native.patterns_native` (native encoders only: HF BERT/ViT
attention is not computed by circuitkd, so its patterns cannot be trained through).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from circuitkd.data.task import Split, Task
from circuitkd.errors import CircuitKDError

POSITIONS = ("all", "read")
MATCHINGS = ("depth",)
# Teacher patterns are precomputed for the whole training split (like the teacher's logits)
# when they fit in this many bytes, else recomputed per batch under no_grad.
MAX_CACHE_BYTES = 1 << 30

HeadId = tuple[int, int]


def _head(value: Any, what: str) -> HeadId:
    try:
        layer, head = value
        if isinstance(layer, bool) or isinstance(head, bool) or int(layer) != layer or int(head) != head:
            raise TypeError
        layer, head = int(layer), int(head)
    except (TypeError, ValueError):
        raise CircuitKDError(f"{what} must be a (layer, head) pair of integers, got {value!r}") from None
    if layer < 0 or head < 0:
        raise CircuitKDError(f"{what} must have non-negative layer and head, got {value!r}")
    return layer, head


def _heads(values: Any, what: str) -> Optional[tuple[HeadId, ...]]:
    if values is None:
        return None
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise CircuitKDError(f"{what} must be a list of (layer, head) pairs, got {values!r}")
    return tuple(dict.fromkeys(_head(v, what) for v in values))


def _explicit_matching(matching: Any) -> tuple[tuple[HeadId, HeadId], ...]:
    pairs = getattr(matching, "matching", matching)  # an AttentionDiff gives its .matching
    if isinstance(pairs, (str, bytes)) or not hasattr(pairs, "__iter__"):
        raise CircuitKDError(f"matching must be one of {MATCHINGS}, an AttentionDiff or a list of "
                             f"((teacher layer, head), (student layer, head)) pairs, got {matching!r}")
    out = []
    for i, pair in enumerate(pairs):
        if isinstance(pair, dict):  # AttentionDiff.to_dict() rows: {"student": "1.0", "teacher": "2.3"}
            pair = tuple(tuple(int(x) for x in str(pair[k]).split(".")) for k in ("teacher", "student"))
        try:
            t, s = pair[0], pair[1]
        except (TypeError, IndexError, KeyError):
            raise CircuitKDError(f"matching pair {i} must be ((teacher layer, head), (student layer, head)[, "
                                 f"similarity]), got {pair!r}") from None
        out.append((_head(t, f"matching pair {i}'s teacher head"), _head(s, f"matching pair {i}'s student head")))
    if not out:
        raise CircuitKDError("matching is empty: no (teacher head, student head) pairs to transfer")
    return tuple(out)


def _check_coef(coef: Any) -> None:
    if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not math.isfinite(coef) or coef < 0:
        raise CircuitKDError(f"attention transfer coef must be a finite number >= 0, got {coef!r}")


@dataclass(frozen=True)
class AttentionTransfer:
    """Settings of the attention-transfer fix (``distill(..., attention_transfer=AttentionTransfer(...))``).

    Attributes:
        coef: weight of the attention loss (finite, ``>= 0``), added to the KD objective.
        positions: "all" (every real destination row, the default) or "read" (the read-out row only).
        matching: "depth" (relative depth, the default); an :class:`~circuitkd.attention.AttentionDiff`
            (its Hungarian-by-pattern matching, e.g. ``diff_attention(teacher, kd_student, task)`` of the
            plain-KD student of the same spec and seed, whose head slots start from the same
            initialisation); or a list of ``((teacher layer, head), (student layer, head)[, similarity])``.
        teacher_heads: transfer only to/from these teacher heads (e.g. the teacher's shortcut heads).
        student_heads: transfer only into these student heads (e.g. the heads the diff flags).
        circuit: circuit-guided variant: an int ``k`` (discover the teacher's circuit on
            ``task.shortcut_pairs(circuit_pairs)`` with ``circuit_method`` and keep the heads of its
            top-``k`` edges) or a :class:`~circuitkd.circuits.Circuit` of the teacher (its kept edges' heads).
        circuit_pairs: shortcut-conflict pairs used to discover the circuit.
        circuit_method: circuit discovery method ("eap-ig" by default).
    """

    coef: float = 1.0
    positions: str = "all"
    matching: Any = "depth"
    teacher_heads: Optional[Sequence[HeadId]] = None
    student_heads: Optional[Sequence[HeadId]] = None
    circuit: Any = None
    circuit_pairs: int = 256
    circuit_method: str = "eap-ig"

    def __post_init__(self) -> None:
        _check_coef(self.coef)
        if self.positions not in POSITIONS:
            raise CircuitKDError(f"attention transfer positions must be one of {POSITIONS}, got {self.positions!r}")
        if isinstance(self.matching, str):
            if self.matching not in MATCHINGS:
                raise CircuitKDError(f"unknown attention transfer matching {self.matching!r}; expected one of "
                                     f"{MATCHINGS}, an AttentionDiff or a list of (student head, teacher head) pairs")
        else:
            object.__setattr__(self, "matching", _explicit_matching(self.matching))
        object.__setattr__(self, "teacher_heads", _heads(self.teacher_heads, "teacher_heads"))
        object.__setattr__(self, "student_heads", _heads(self.student_heads, "student_heads"))
        c = self.circuit
        if c is not None and not hasattr(c, "top_edges"):
            if isinstance(c, bool) or not isinstance(c, int) or c <= 0:
                raise CircuitKDError(f"circuit must be a positive number of top edges or a Circuit, got {c!r}")
        if isinstance(self.circuit_pairs, bool) or not isinstance(self.circuit_pairs, int) or self.circuit_pairs <= 0:
            raise CircuitKDError(f"circuit_pairs must be a positive integer, got {self.circuit_pairs!r}")

    @classmethod
    def coerce(cls, value: Any) -> Optional["AttentionTransfer"]:
        """None/False → None; True → defaults; a dict of fields; or an :class:`AttentionTransfer`."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(cls.__dataclass_fields__))
            if unknown:
                raise CircuitKDError(f"unknown attention transfer options {unknown}; "
                                     f"expected some of {sorted(cls.__dataclass_fields__)}")
            _check_coef(value.get("coef", 1.0))  # before a type checker on __init__ can see it
            return cls(**value)
        raise CircuitKDError(f"attention_transfer must be None, True, a dict or an AttentionTransfer, "
                             f"got {type(value).__name__}")

    @property
    def restricted(self) -> bool:
        """Whether it names heads of particular models (which only fit a single teacher/student stage)."""
        return (not isinstance(self.matching, str) or self.teacher_heads is not None
                or self.student_heads is not None or self.circuit is not None)


@dataclass
class TransferPlan:
    """Resolved matched pairs ``[(student layer, head, teacher layer, head)]`` and the loss settings."""

    pairs: list[tuple[int, int, int, int]]
    coef: float
    positions: str
    matching: str
    circuit_heads: Optional[list[HeadId]] = None
    info: dict = field(default_factory=dict)

    @property
    def teacher_heads(self) -> list[HeadId]:
        return list(dict.fromkeys((tl, th) for _, _, tl, th in self.pairs))

    def to_dict(self) -> dict[str, Any]:
        return {"coef": self.coef, "positions": self.positions, "matching": self.matching,
                "pairs": [{"student": f"{sl}.{sh}", "teacher": f"{tl}.{th}"} for sl, sh, tl, th in self.pairs],
                "circuit_heads": None if self.circuit_heads is None else [f"{l}.{h}" for l, h in self.circuit_heads],
                **self.info}


def _backbone(model) -> str:
    from circuitkd.models.build import spec_of

    try:
        return spec_of(model).backbone
    except Exception:  # noqa: BLE001 - any bridge without a spec: name its class instead
        return type(getattr(model, "original_model", model)).__name__


def check_backbone(model, role: str) -> None:
    """Refuse a model whose attention patterns circuitkd cannot train through (not a native encoder)."""
    from circuitkd.native import supported

    if not supported(model):
        raise CircuitKDError(
            f"attention transfer needs the {role}'s attention patterns with gradients, but the {role} is a "
            f"{_backbone(model)!r} model: only native circuitkd encoders (backbone='native', LayerNorm, learned "
            "positions) compute attention in circuitkd.native; HF BERT/ViT attention ignores pattern hooks"
        )


def circuit_heads(circuit, k: Optional[int] = None) -> list[HeadId]:
    """Heads ``(layer, head)`` on ``circuit``: of its top-``k`` edges, or of its kept edges when ``k`` is None."""
    items = [e for e, _ in circuit.top_edges(k)] if k is not None else circuit.edges
    heads: dict[HeadId, None] = {}
    for item in items:
        item = item[0] if isinstance(item, tuple) else item  # per-position graphs: (edge, pos)
        nodes = (item.src, item.dst) if hasattr(item, "src") else (item,)
        for node in nodes:
            if node.kind == "head":
                heads[(int(node.layer), int(node.head))] = None
    return list(heads)


def _shape(model) -> tuple[int, int]:
    return int(model.cfg.n_layers), int(model.cfg.n_heads)


def _check_in(heads: Sequence[HeadId], model, role: str, what: str) -> None:
    L, H = _shape(model)
    for layer, head in heads:
        if layer >= L or head >= H:
            raise CircuitKDError(f"{what} names head {layer}.{head}, which the {role} does not have "
                                 f"({L} layers x {H} heads)")


def depth_matching(teacher_shape: tuple[int, int], student_shape: tuple[int, int],
                   teacher_heads: Sequence[HeadId]) -> list[tuple[int, int, int, int]]:
    """One-to-one ``(sl, sh, tl, th)`` pairs minimising relative-depth distance (Hungarian on the cost).

    Cost ``|sl/Ls - tl/Lt| + 1e-3 · |sh/Hs - th/Ht|``: layers first, then heads; when there are
    more target heads than student heads, the farthest are left out.
    """
    from scipy.optimize import linear_sum_assignment

    (Lt, Ht), (Ls, Hs) = teacher_shape, student_shape
    students = [(l, h) for l in range(Ls) for h in range(Hs)]
    cost = torch.tensor([[abs(sl / Ls - tl / Lt) + 1e-3 * abs(sh / Hs - th / Ht) for tl, th in teacher_heads]
                         for sl, sh in students], dtype=torch.float64)
    rows, cols = linear_sum_assignment(cost.numpy())
    return sorted((*students[r], *teacher_heads[c]) for r, c in zip(rows.tolist(), cols.tolist()))


def plan_transfer(cfg: AttentionTransfer, teacher, student, task: Optional[Task] = None, *,
                  seed: int = 0) -> TransferPlan:
    """Resolve ``cfg`` against a teacher and a (freshly built) student into matched head pairs.

    Raises :class:`CircuitKDError` before any training for a backbone without trainable patterns,
    heads or matching pairs a model does not have, or nothing left to transfer.
    """
    check_backbone(teacher, "teacher")
    check_backbone(student, "student")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CircuitKDError("attention transfer runs in one process: its patterns come from circuitkd.native, "
                             "which DistributedDataParallel does not wrap; launch without torchrun")
    Lt, Ht = _shape(teacher)
    targets = [(l, h) for l in range(Lt) for h in range(Ht)]
    if cfg.teacher_heads is not None:
        _check_in(cfg.teacher_heads, teacher, "teacher", "teacher_heads")
        targets = [t for t in targets if t in set(cfg.teacher_heads)]
    on_circuit = None
    info: dict[str, Any] = {}
    if cfg.circuit is not None:
        if hasattr(cfg.circuit, "top_edges"):
            on_circuit = circuit_heads(cfg.circuit)
            info["circuit"] = {"edges": cfg.circuit.n_edges, "method": cfg.circuit.method}
        else:
            if task is None:
                raise CircuitKDError("a circuit-guided transfer with circuit=k needs the task for its shortcut pairs")
            from circuitkd.circuits import discover

            pairs = task.shortcut_pairs(n=cfg.circuit_pairs, seed=seed)
            found = discover(teacher, pairs, method=cfg.circuit_method, top_k=cfg.circuit)
            on_circuit = circuit_heads(found, cfg.circuit)
            info["circuit"] = {"top_k": cfg.circuit, "method": cfg.circuit_method, "n_pairs": len(pairs.clean)}
        _check_in(on_circuit, teacher, "teacher", "the circuit")
        targets = [t for t in targets if t in set(on_circuit)]
        if not targets:
            among = " among teacher_heads" if cfg.teacher_heads is not None else ""
            raise CircuitKDError(f"the teacher's circuit has no attention heads{among} (heads on it: {on_circuit}): "
                                 "nothing to transfer; keep more edges")
    if isinstance(cfg.matching, str) and cfg.matching == "depth":
        pairs4 = depth_matching((Lt, Ht), _shape(student), targets)
        method = "depth (one-to-one by relative depth)"
    else:
        _check_in([s for _, s in cfg.matching], student, "student", "the matching")
        _check_in([t for t, _ in cfg.matching], teacher, "teacher", "the matching")
        keep = set(targets)
        pairs4 = [(*s, *t) for t, s in cfg.matching if t in keep]
        method = "given (e.g. diff_attention's Hungarian by pattern)"
    if cfg.student_heads is not None:
        _check_in(cfg.student_heads, student, "student", "student_heads")
        pairs4 = [p for p in pairs4 if (p[0], p[1]) in set(cfg.student_heads)]
    if not pairs4:
        raise CircuitKDError("attention transfer has no (student head, teacher head) pair left after the "
                             f"matching ({method}) and head restrictions: nothing to transfer")
    return TransferPlan(pairs=sorted(pairs4), coef=float(cfg.coef), positions=cfg.positions, matching=method,
                        circuit_heads=on_circuit, info=info)


def attention_transfer_loss(student_patterns: Float[Tensor, "batch pair dest_pos src_pos"],
                            teacher_patterns: Float[Tensor, "batch pair dest_pos src_pos"],
                            rows: Float[Tensor, "batch dest_pos"]) -> Tensor:
    """Mean of ``KL(teacher row ‖ student row)`` over pairs and over the rows weighted by ``rows``.

    ``rows`` is 1 for the destination rows that count (real tokens, or the read-out row) and 0
    elsewhere. Sources the teacher gives zero attention (padding) add nothing.
    """
    if student_patterns.shape != teacher_patterns.shape:
        raise CircuitKDError(f"student patterns {tuple(student_patterns.shape)} and teacher patterns "
                             f"{tuple(teacher_patterns.shape)} differ in shape")
    t = teacher_patterns.to(student_patterns.dtype)
    # clamp, not xlogy: 0 · log 0 terms must have zero gradient too.
    kl = (t * (torch.log(t.clamp_min(1e-30)) - torch.log(student_patterns.clamp_min(1e-30)))).sum(-1)
    w = rows.to(kl.dtype)[:, None, :]
    return (kl * w).sum() / (w.sum() * kl.shape[1]).clamp_min(1)


class AttentionLoss:
    """``loss(model, batch, student_patterns)``: ``coef · L_att`` on a training batch.

    The teacher's patterns for the plan's teacher heads are precomputed on ``split`` (indexed by
    ``batch.index``, like the teacher's logits) when they fit in ``max_cache_bytes``; otherwise
    they are recomputed per batch under no_grad. Both give the same loss.
    """

    def __init__(self, plan: TransferPlan, teacher, split: Split, device, *,
                 max_cache_bytes: int = MAX_CACHE_BYTES, batch_size: int = 256):
        from circuitkd.models.build import model_device

        self.plan, self.teacher = plan, teacher
        self.device, self.teacher_device = torch.device(device), model_device(teacher)
        self.coef = plan.coef
        self.read = plan.positions == "read"
        self.teacher_heads = plan.teacher_heads
        col = {t: i for i, t in enumerate(self.teacher_heads)}
        self.t_layer = torch.tensor([tl for tl, _ in self.teacher_heads], device=self.teacher_device)
        self.t_head = torch.tensor([th for _, th in self.teacher_heads], device=self.teacher_device)
        self.t_col = torch.tensor([col[(tl, th)] for _, _, tl, th in plan.pairs], device=device)
        self.s_layer = torch.tensor([sl for sl, _, _, _ in plan.pairs], device=device)
        self.s_head = torch.tensor([sh for _, sh, _, _ in plan.pairs], device=device)
        N, P = len(split), int(split.inputs.shape[1])
        n_bytes = N * len(self.teacher_heads) * (1 if self.read else P) * P * 4
        self.cache: Optional[Tensor] = None
        if n_bytes <= max_cache_bytes:
            chunks = []
            for lo in range(0, N, batch_size):
                mask = None if split.attention_mask is None else split.attention_mask[lo:lo + batch_size]
                chunks.append(self._teacher(split.inputs[lo:lo + batch_size], mask))
            self.cache = torch.cat(chunks)

    def _teacher(self, inputs: Tensor, mask: Optional[Tensor]) -> Tensor:
        """``[batch, teacher head, dest_pos | 1, src_pos]`` patterns of the plan's teacher heads (student's device)."""
        from circuitkd.models.build import read_positions
        from circuitkd.native import patterns_native

        inputs = inputs.to(self.teacher_device)
        mask = None if mask is None else mask.to(self.teacher_device)
        with torch.no_grad():
            _, pt = patterns_native(self.teacher, inputs, mask)
            pt = pt[:, self.t_layer, self.t_head]
            if self.read:
                pos = read_positions(self.teacher, inputs, mask)
                pt = pt[torch.arange(len(pos), device=pt.device), :, pos][:, :, None]
        return pt.float().to(self.device)

    def __call__(self, model, batch, student_patterns: Float[Tensor, "batch layer head dest_pos src_pos"]) -> Tensor:
        from circuitkd.models.build import read_positions

        ps = student_patterns[:, self.s_layer, self.s_head]  # [batch pair dest src]
        B, _, _, W = ps.shape
        if self.cache is not None:
            pt = self.cache[batch.index.to(self.cache.device)].to(ps.device)[..., :W]
            if not self.read:
                pt = pt[..., :W, :]
        else:
            pt = self._teacher(batch.inputs, batch.attention_mask)
        pt = pt[:, self.t_col]
        if self.read:
            pos = read_positions(model, batch.inputs, batch.attention_mask)
            ps = ps[torch.arange(B, device=ps.device), :, pos][:, :, None]
            rows = torch.ones(B, 1, device=ps.device)
        elif batch.attention_mask is not None:
            rows = batch.attention_mask.float()
        else:
            rows = torch.ones(B, W, device=ps.device)
        return self.coef * attention_transfer_loss(ps, pt, rows)

