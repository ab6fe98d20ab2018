"""Teacher vs student attention (:func:`diff_attention`): both models' statistics, every head pair's
pattern similarity, the head matching and layer CKA, on the same inputs, in one streaming pass."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from circuitkd.data.task import Split, Task
from circuitkd.errors import CircuitKDError
from circuitkd.hooks import Site, backbone_of, n_heads, n_layers
from circuitkd.attention.common import (
    _batches, _check_inputs, _class_stack, _Data, head_name, _LN2, MATCHINGS, _model_n_classes,
    _pattern_sites, _patterns, position_masks, _prepare, _read_index, _real_positions, _run_batch, SHORTCUT,
    SIMILARITIES,
)
from circuitkd.attention.shortcut_heads import _conflict_labels, shortcut_heads, ShortcutHeads
from circuitkd.attention.similarity import _CKA, match_heads, _PairSimilarity
from circuitkd.attention.statistics import AttentionStats, _new_stats, _update_stats

#: Name of the union of the shortcut token classes in every statistic.

@dataclass
class ExamplePatterns:
    """Both models' attention on one example, for the side-by-side figure.

    ``teacher``/``student``: ``[layer head dest_pos src_pos]``; ``labels``: one label per
    position; ``shortcut_positions``: positions of shortcut tokens (``shortcut_classes``: by
    shortcut class); ``length``: real positions; ``read_position``: where the class is read
    (0 for a CLS encoder); ``image``: ``[channel height width]`` pixels of an image example
    (positions are then CLS + patches in raster order), None for text.
    """

    index: int
    labels: list[str]
    teacher: Tensor
    student: Tensor
    shortcut_positions: list[int]
    length: int
    read_position: int = 0
    shortcut_classes: dict[str, list[int]] = field(default_factory=dict)
    image: Optional[Tensor] = None

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "labels": self.labels, "teacher": self.teacher.tolist(),
                "student": self.student.tolist(), "shortcut_positions": self.shortcut_positions,
                "length": self.length, "read_position": self.read_position,
                "shortcut_classes": self.shortcut_classes,
                "image": None if self.image is None else self.image.tolist()}

    def readout_mass(self, model: str, head: tuple[int, int], positions: Optional[Sequence[int]] = None) -> float:
        """Attention of ``model``'s (``"teacher"`` or ``"student"``) ``head`` from the read-out
        position onto ``positions`` (the shortcut positions by default)."""
        if model not in ("teacher", "student"):
            raise CircuitKDError(f"model must be 'teacher' or 'student', got {model!r}")
        pattern = self.teacher if model == "teacher" else self.student
        where = sorted(set(self.shortcut_positions if positions is None else positions))
        return float(pattern[head[0], head[1], self.read_position, where].sum())


@dataclass
class AttentionDiff:
    """Teacher vs student attention on the same inputs (see :func:`diff_attention`).

    Attributes:
        teacher, student: :class:`AttentionStats` of each model (``[layer head]`` tensors by token class).
        similarity: ``[teacher head, student head]`` (flat ``layer * n_heads + head``) used for matching.
        js: ``[student head, teacher head]`` Jensen–Shannon divergence (nats, 0..ln 2).
        corr: ``[student head, teacher head]`` pattern correlation.
        matching: ``[((teacher layer, head), (student layer, head), similarity), ...]``, in student head order.
        matching_method: how the heads were matched, e.g. "hungarian (one-to-one, 8 of 16 teacher heads unmatched)".
        cka: ``[student layer, teacher layer]`` linear CKA of the residual streams after each block.
        shortcut_change: per matched pair, student − teacher attention from the read-out position to
            shortcut tokens; ``shortcut_change_by_class`` the same for each shortcut class.
        teacher_heads, student_heads: :class:`ShortcutHeads` when confirmation was run.
        example: both models' patterns on one bias-conflicting example.
    """

    teacher: AttentionStats
    student: AttentionStats
    similarity: Tensor
    similarity_kind: str
    js: Tensor
    corr: Tensor
    matching: list[tuple[tuple[int, int], tuple[int, int], float]]
    matching_method: str
    cka: Tensor
    shortcut_change: Tensor
    shortcut_change_by_class: dict[str, Tensor]
    teacher_heads: Optional[ShortcutHeads] = None
    student_heads: Optional[ShortcutHeads] = None
    example: Optional[ExamplePatterns] = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def shortcut(self) -> tuple[str, ...]:
        return self.teacher.shortcut

    def summary(self, k: int = 3) -> list[str]:
        """Readable findings naming heads "L.H" with their numbers."""
        t, s = self.teacher, self.student
        lines = [
            f"teacher {t.n_layers}x{t.n_heads} heads ({t.backbone}), student {s.n_layers}x{s.n_heads} heads "
            f"({s.backbone}); split {t.split}, {t.n_examples} examples; shortcut tokens: {', '.join(self.shortcut)}",
        ]
        for name, st, heads in (("teacher", t, self.teacher_heads), ("student", s, self.student_heads)):
            top = ", ".join(f"{head_name(la, h)} {v:.3f}" for la, h, v in st.top_heads(k))
            lines.append(f"{name} top shortcut heads (CLS -> shortcut mass): {top}")
            for cls in self.shortcut:
                la, h, v = st.top_heads(1, cls)[0]
                lines.append(f"  {name} {cls}: strongest head {head_name(la, h)} {v:.3f}, "
                             f"mean over heads {float(st.from_read[cls].nanmean()):.3f}")
            if heads is not None:
                conf = ", ".join(f"{head_name(la, h)} Δlogit-diff {e:+.3f}" for la, h, _, e, ok in heads.ranking if ok)
                lines.append(f"  {name} confirmed by ablation on {heads.n_conflicting} bias-conflicting examples "
                             f"(top {heads.k} by attention, |Δ| >= {heads.min_effect}): {conf or 'none'}")
        ts, ss = t.shortcut_attention(), s.shortcut_attention()
        t_mean, s_mean = float(ts.nanmean()), float(ss.nanmean())
        t_max, s_max = float(ts.nan_to_num(-1).max()), float(ss.nan_to_num(-1).max())
        verdict = "higher" if s_mean > t_mean else "lower" if s_mean < t_mean else "equal"
        lines.append(f"shortcut attention, mean over heads: teacher {t_mean:.3f}, student {s_mean:.3f} "
                     f"(student {verdict}, {s_mean - t_mean:+.3f}); max: teacher {t_max:.3f}, student {s_max:.3f}")
        lines.append(f"head matching: {self.matching_method}, by "
                     f"{'1 - JS/ln2' if self.similarity_kind == 'js' else 'pattern correlation'}; "
                     f"mean similarity {float(np.mean([m[2] for m in self.matching])):.3f}")
        order = sorted(range(len(self.matching)), key=lambda i: -abs(float(self.shortcut_change[i])))
        for i in order[:k]:
            (tl, th), (sl, sh), sim = self.matching[i]
            tv, sv = float(t.shortcut_attention()[tl, th]), float(s.shortcut_attention()[sl, sh])
            lines.append(f"  student {head_name(sl, sh)} <-> teacher {head_name(tl, th)} (similarity {sim:.3f}): "
                         f"shortcut attention {tv:.3f} -> {sv:.3f} ({sv - tv:+.3f})")
        best = self.cka.argmax(1)
        cka = ", ".join(f"student L{i} ~ teacher L{int(j)} {float(self.cka[i, j]):.3f}" for i, j in enumerate(best))
        lines.append(f"linear CKA of residual streams (best teacher layer per student layer): {cka}")
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "teacher": self.teacher.to_dict(), "student": self.student.to_dict(),
            "similarity": self.similarity.tolist(), "similarity_kind": self.similarity_kind,
            "js": self.js.tolist(), "corr": self.corr.tolist(),
            "matching": [{"teacher": head_name(*t), "student": head_name(*s), "similarity": sim}
                         for t, s, sim in self.matching],
            "matching_method": self.matching_method, "cka": self.cka.tolist(),
            "shortcut_change": self.shortcut_change.tolist(),
            "shortcut_change_by_class": {k: v.tolist() for k, v in self.shortcut_change_by_class.items()},
            "teacher_heads": None if self.teacher_heads is None else self.teacher_heads.to_dict(),
            "student_heads": None if self.student_heads is None else self.student_heads.to_dict(),
            "example": None if self.example is None else self.example.to_dict(),
            "summary": self.summary(), "info": self.info,
        }

    def to_json(self, path: str | Path | None = None) -> str:
        """JSON of every number (and the summary); written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text


def _check_pair(teacher, student, data: _Data) -> None:
    _check_inputs(teacher, data, "teacher")
    _check_inputs(student, data, "student")
    t_cls, s_cls = _model_n_classes(teacher), _model_n_classes(student)
    if t_cls is not None and s_cls is not None and t_cls != s_cls:
        raise CircuitKDError(f"teacher and student were trained on different tasks: {t_cls} vs {s_cls} classes")
    if not data.image and int(teacher.cfg.d_vocab) != int(student.cfg.d_vocab):
        raise CircuitKDError(f"teacher and student have different vocabularies: {int(teacher.cfg.d_vocab)} vs "
                             f"{int(student.cfg.d_vocab)} tokens (trained on different tasks?)")


def _resid(acts: Mapping[Site, Tensor], L: int, real: Tensor, read: Optional[Tensor]) -> list[Tensor]:
    """Per layer, the residual rows CKA compares: every real position, or the read-out position."""
    out = []
    for layer in range(L):
        r = acts[Site(layer, "resid_post")]
        real, read = real.to(r.device), None if read is None else read.to(r.device)
        if read is not None:
            out.append(r[torch.arange(r.shape[0], device=r.device), read])
        else:
            out.append(r.reshape(-1, r.shape[-1])[real.reshape(-1) > 0])
    return out


def _position_labels(data: _Data, i: int, n_pos: int) -> list[str]:
    if data.image:
        return ["CLS"] + [f"p{j}" for j in range(n_pos - 1)]
    ids = data.split.inputs[i, :n_pos].tolist()
    tok = getattr(data.task, "tokenizer", None) if data.task is not None else None
    if tok is not None and hasattr(tok, "convert_ids_to_tokens"):
        try:
            return [f"{j}:{w}" for j, w in enumerate(tok.convert_ids_to_tokens(ids))]
        except Exception:  # noqa: BLE001 - a foreign tokenizer that cannot decode: fall back to ids
            pass
    return [f"{j}:{t}" for j, t in enumerate(ids)]


def _example(teacher, student, data: _Data) -> ExamplePatterns:
    conflicting = _conflict_labels(data)[0] if data.split.bias_labels else torch.zeros(len(data.split), dtype=torch.bool)
    union = _class_stack(data, slice(0, len(data.split)))[:, -1].flatten(1).any(-1)
    candidates = torch.nonzero(conflicting & union).flatten()
    if len(candidates) == 0:
        candidates = torch.nonzero(union).flatten()
    i = int(candidates[0]) if len(candidates) else 0
    idx = slice(i, i + 1)
    pt = _patterns(_run_batch(teacher, data, idx, _pattern_sites(teacher)), n_layers(teacher))[0]
    ps = _patterns(_run_batch(student, data, idx, _pattern_sites(student)), n_layers(student))[0]
    P = pt.shape[-1]
    length = P if data.split.attention_mask is None else int(data.split.attention_mask[i].sum())
    classes = position_masks(_class_stack(data, idx), P)[0]
    shortcut = classes[-1]
    by_class = {name: [j for j in range(length) if bool(classes[data.class_names.index(name), j])]
                for name in data.shortcut}
    real = torch.zeros(1, P)
    real[0, :length] = 1
    return ExamplePatterns(index=int(data.index[i]), labels=_position_labels(data, i, P)[:length],
                           teacher=pt[..., :length, :length].float().cpu(),
                           student=ps[..., :length, :length].float().cpu(),
                           shortcut_positions=[j for j in range(length) if bool(shortcut[j])], length=length,
                           read_position=int(_read_index(student, real)[0]), shortcut_classes=by_class,
                           image=data.split.inputs[i].float().cpu().clone() if data.image else None)


def diff_attention(teacher, student, task: Task | Split, *, split: str = "ood_test", n: Optional[int] = 512,
                   batch_size: int = 64, matching: str = "hungarian", similarity: str = "js",
                   shortcut: Any = None, confirm: str = "ablation", cka_positions: str = "all",
                   seed: int = 0) -> AttentionDiff:
    """Compare a teacher's and a student's attention on the same ``n`` examples.

    One streaming pass over the data runs both models on each batch and accumulates each
    model's :class:`AttentionStats`, the pattern similarity of every (student head, teacher
    head) pair, and linear CKA between every pair of layers' residual streams. Heads are then
    matched (``matching``: "hungarian" one-to-one, or "greedy" many-to-one) by
    ``similarity`` ("js": 1 − JS/ln 2; "corr": pattern correlation). With ``confirm="ablation"`` (the
    default) each model's shortcut heads are confirmed by mean-ablation (:func:`shortcut_heads`, no
    patching); ``confirm="none"`` skips it.

    Teacher and student may differ in depth, width and head count; they must read the same
    inputs (same vocabulary, same number of attention positions).

    Args:
        cka_positions: "all" (every real token is a CKA row) or "read" (the read-out position only).

    Returns:
        :class:`AttentionDiff` (``.summary()`` for readable lines, ``.to_json()`` for the numbers).
    """
    if similarity not in SIMILARITIES:
        raise CircuitKDError(f"unknown similarity {similarity!r}; expected one of {SIMILARITIES}")
    if matching not in MATCHINGS:
        raise CircuitKDError(f"unknown matching {matching!r}; expected one of {MATCHINGS}")
    if confirm not in ("ablation", "none"):
        raise CircuitKDError(f"confirm must be 'ablation' or 'none', got {confirm!r}")
    if cka_positions not in ("all", "read"):
        raise CircuitKDError(f"cka_positions must be 'all' or 'read', got {cka_positions!r}")
    data = _prepare(task, split, n, shortcut, seed)
    _check_pair(teacher, student, data)
    Lt, Ht, Ls, Hs = n_layers(teacher), n_heads(teacher), n_layers(student), n_heads(student)
    t_stats, s_stats = _new_stats(teacher, data), _new_stats(student, data)
    sim = _PairSimilarity(Ls * Hs, Lt * Ht)
    cka = _CKA(Lt, Ls, int(teacher.cfg.d_model), int(student.cfg.d_model))
    t_sites = _pattern_sites(teacher) + [Site(layer, "resid_post") for layer in range(Lt)]
    s_sites = _pattern_sites(student) + [Site(layer, "resid_post") for layer in range(Ls)]
    for idx in _batches(data, batch_size):
        t_acts = _run_batch(teacher, data, idx, t_sites)
        s_acts = _run_batch(student, data, idx, s_sites)
        pt = _update_stats(t_stats, teacher, data, idx, t_acts)
        ps = _update_stats(s_stats, student, data, idx, s_acts)
        if pt.shape[-1] != ps.shape[-1]:
            raise CircuitKDError(f"teacher and student attend over different positions ({pt.shape[-1]} vs "
                                 f"{ps.shape[-1]}): patterns cannot be compared")
        dev, P = pt.device, pt.shape[-1]
        real = _real_positions(data, idx, P, dev)
        sim.update(ps.to(dev).flatten(1, 2), pt.flatten(1, 2), real)
        by_read = cka_positions == "read"
        xs = _resid(t_acts, Lt, real, _read_index(teacher, real) if by_read else None)
        ys = _resid(s_acts, Ls, real, _read_index(student, real) if by_read else None)
        cka.update(xs, [y.to(dev) for y in ys])
    t_res = t_stats.result(data.shortcut, data.split_name, backbone_of(teacher))
    s_res = s_stats.result(data.shortcut, data.split_name, backbone_of(student))
    js, corr = sim.js_divergence().T, sim.correlation().T  # [teacher head, student head]
    score = 1.0 - js / _LN2 if similarity == "js" else corr
    flat_pairs, method = match_heads(score, method=matching)
    pairs = [((t // Ht, t % Ht), (s // Hs, s % Hs), v) for t, s, v in flat_pairs]

    def change(cls: str) -> Tensor:
        tv, sv = t_res.shortcut_attention(cls), s_res.shortcut_attention(cls)
        return torch.tensor([float(sv[s]) - float(tv[t]) for t, s, _ in pairs])

    teacher_heads = student_heads = None
    if confirm == "ablation":
        teacher_heads = shortcut_heads(teacher, data.split, n=None, batch_size=batch_size,
                                       shortcut=list(data.shortcut), confirm="ablation", stats=t_res)
        student_heads = shortcut_heads(student, data.split, n=None, batch_size=batch_size,
                                       shortcut=list(data.shortcut), confirm="ablation", stats=s_res)
    return AttentionDiff(
        teacher=t_res, student=s_res, similarity=score, similarity_kind=similarity, js=js, corr=corr,
        matching=pairs, matching_method=method, cka=cka.result(), shortcut_change=change(SHORTCUT),
        shortcut_change_by_class={c: change(c) for c in data.shortcut},
        teacher_heads=teacher_heads, student_heads=student_heads, example=_example(teacher, student, data),
        info={"split": data.split_name, "n": len(data.split), "seed": seed, "matching": matching,
              "similarity": similarity, "cka_positions": cka_positions, "shortcut": list(data.shortcut),
              "teacher_shape": [Lt, Ht, int(teacher.cfg.d_model)], "student_shape": [Ls, Hs, int(student.cfg.d_model)]},
    )

