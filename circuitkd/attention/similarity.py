"""Comparing two models' heads and layers: pattern similarity of every head pair (1 − Jensen–Shannon
/ ln 2, or correlation), one-to-one matching (Hungarian, Kuhn 1955; or greedy) and linear CKA
(Kornblith et al. 2019) of residual streams."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from circuitkd.errors import CircuitKDError
from circuitkd.attention.common import MATCHINGS

#: Name of the union of the shortcut token classes in every statistic.

def linear_cka(x: Float[Tensor, "n_x d_x"], y: Float[Tensor, "n_y d_y"]) -> float:
    """Linear CKA of two representations of the same ``n`` examples (Kornblith et al. 2019).

    ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred ``Xc``, ``Yc``:
    1 for identical representations, invariant to orthogonal transforms and isotropic scaling.
    """
    if x.shape[0] != y.shape[0]:
        raise CircuitKDError(f"linear_cka needs the same examples in both: {x.shape[0]} vs {y.shape[0]} rows")
    acc = _CKA(1, 1, x.shape[1], y.shape[1])
    acc.update([x], [y])
    return float(acc.result()[0, 0])


class _CKA:
    """Streaming linear CKA between every student layer and every teacher layer.

    Keeps ``sum x``, ``sum y``, ``X^T X``, ``Y^T Y`` and ``Y^T X`` (float64), so memory is
    fixed by the widths, not the number of examples.
    """

    def __init__(self, n_teacher: int, n_student: int, d_teacher: int, d_student: int):
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        self.sx, self.sy = z(n_teacher, d_teacher), z(n_student, d_student)
        self.xx, self.yy = z(n_teacher, d_teacher, d_teacher), z(n_student, d_student, d_student)
        self.yx = z(n_student, n_teacher, d_student, d_teacher)
        self.n = 0

    def update(self, xs: Sequence[Tensor], ys: Sequence[Tensor]) -> None:
        """``xs``: per teacher layer ``[rows d_teacher]``; ``ys``: per student layer ``[rows d_student]``."""
        X = torch.stack([x.double() for x in xs])  # [Lt rows dt]
        Y = torch.stack([y.double() for y in ys])
        self.sx += X.sum(1).cpu()
        self.sy += Y.sum(1).cpu()
        self.xx += torch.einsum("lni,lnj->lij", X, X).cpu()
        self.yy += torch.einsum("lni,lnj->lij", Y, Y).cpu()
        self.yx += torch.einsum("sni,tnj->stij", Y, X).cpu()
        self.n += int(X.shape[1])

    def result(self) -> Tensor:
        if self.n < 2:
            raise CircuitKDError(f"CKA needs at least 2 rows, got {self.n}")
        n = self.n
        mx, my = self.sx / n, self.sy / n
        cxx = self.xx - n * torch.einsum("li,lj->lij", mx, mx)
        cyy = self.yy - n * torch.einsum("li,lj->lij", my, my)
        cyx = self.yx - n * torch.einsum("si,tj->stij", my, mx)
        num = (cyx ** 2).sum((-2, -1))
        den = torch.linalg.matrix_norm(cyy)[:, None] * torch.linalg.matrix_norm(cxx)[None, :]
        return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num)).float()

class _PairSimilarity:
    """Streaming pattern similarity between every student head and every teacher head.

    JS: mean over real destinations and examples of the Jensen–Shannon divergence (nats)
    between the two heads' attention distributions. Correlation: Pearson over every
    (example, real destination, real source) entry, from running sums.
    """

    def __init__(self, n_student: int, n_teacher: int, chunk_elems: int = 1 << 22):
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        self.js = z(n_student, n_teacher)
        self.sx, self.sxx, self.sy, self.syy = z(n_student), z(n_student), z(n_teacher), z(n_teacher)
        self.sxy = z(n_student, n_teacher)
        self.count = 0.0
        self.n = 0
        self.chunk_elems = chunk_elems

    def update(self, ps: Tensor, pt: Tensor, real: Tensor) -> None:
        """``ps`` [b S q k] student patterns, ``pt`` [b T q k] teacher patterns, ``real`` [b pos]."""
        b, S, P = ps.shape[0], ps.shape[1], ps.shape[-1]
        T = pt.shape[1]
        n_dest = real.sum(1)
        per = max(1, self.chunk_elems // max(1, b * S * P * P))
        hs = torch.xlogy(ps, ps).sum(-1)  # [b S q]: sum p log p
        ht = torch.xlogy(pt, pt).sum(-1)
        for lo in range(0, T, per):
            t = pt[:, lo:lo + per]
            m = (ps[:, :, None] + t[:, None]) / 2  # [b S Tc q k]
            js = 0.5 * (hs[:, :, None] - (ps[:, :, None] * torch.log(m.clamp_min(1e-300))).sum(-1)) \
                + 0.5 * (ht[:, None, lo:lo + per] - (t[:, None] * torch.log(m.clamp_min(1e-300))).sum(-1))
            js = js.clamp_min(0)
            self.js[:, lo:lo + per] += ((js * real[:, None, None]).sum(-1) / n_dest[:, None, None]).sum(0).cpu()
        w = real[:, :, None] * real[:, None, :]  # [b q k]
        xs, xt = ps * w[:, None], pt * w[:, None]
        self.sx += xs.sum((0, 2, 3)).cpu()
        self.sxx += (xs * ps).sum((0, 2, 3)).cpu()
        self.sy += xt.sum((0, 2, 3)).cpu()
        self.syy += (xt * pt).sum((0, 2, 3)).cpu()
        self.sxy += torch.einsum("bsqk,btqk->st", xs, pt).cpu()
        self.count += float(w.sum())
        self.n += b

    def js_divergence(self) -> Tensor:
        return (self.js / max(self.n, 1)).float()

    def correlation(self) -> Tensor:
        N = self.count
        cov = self.sxy - self.sx[:, None] * self.sy[None, :] / N
        vx = (self.sxx - self.sx ** 2 / N).clamp_min(0)
        vy = (self.syy - self.sy ** 2 / N).clamp_min(0)
        den = (vx[:, None] * vy[None, :]).sqrt()
        return torch.where(den > 1e-12, cov / den.clamp_min(1e-300), torch.zeros_like(cov)).float()


def match_heads(similarity: Tensor, *, method: str = "hungarian") -> tuple[list[tuple[int, int, float]], str]:
    """Match teacher heads (rows) and student heads (columns) by ``similarity`` ``[teacher, student]``
    (higher = closer).

    ``"hungarian"``: one-to-one, maximising total similarity (Kuhn 1955, via
    ``scipy.optimize.linear_sum_assignment``; rectangular when the counts differ, leaving the
    surplus heads of the larger model unmatched). ``"greedy"``: each student head takes its most
    similar teacher head (many-to-one). Returns ``([(teacher, student, similarity), ...], description)``
    in student order.
    """
    if method not in MATCHINGS:
        raise CircuitKDError(f"unknown matching {method!r}; expected one of {MATCHINGS}")
    if similarity.dim() != 2 or similarity.numel() == 0:
        raise CircuitKDError(f"similarity must be a non-empty [teacher, student] matrix, got {tuple(similarity.shape)}")
    sim = similarity.double().cpu().numpy()
    T, S = sim.shape
    if method == "greedy":
        best = sim.argmax(0)
        pairs = [(int(best[j]), j, float(sim[best[j], j])) for j in range(S)]
        used = len(set(best.tolist()))
        return pairs, (f"greedy (each student head to its most similar teacher head, many-to-one; "
                       f"{used} of {T} teacher heads used)")
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(np.nan_to_num(sim, nan=-1e9), maximize=True)
    pairs = sorted(((int(r), int(c), float(sim[r, c])) for r, c in zip(rows, cols)), key=lambda p: p[1])
    if S <= T:
        note = f"one-to-one, {T - S} of {T} teacher heads unmatched"
    else:
        note = f"one-to-one, {S - T} of {S} student heads unmatched"
    return pairs, f"hungarian ({note})"

