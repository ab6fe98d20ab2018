"""Shortcut heads: heads ranked by attention to the shortcut tokens and confirmed causally (mean
ablation of each head's ``z`` on bias-conflicting examples, and activation patching where the task
draws counterfactual pairs)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from circuitkd.data.task import Split, Task
from circuitkd.engine import Mean, model_device, run
from circuitkd.errors import CircuitKDError
from circuitkd.hooks import Site, hook_name, n_heads, n_layers
from circuitkd.metrics import MetricArg
from circuitkd.attention.common import _check_inputs, _Data, head_name, _prepare, _top
from circuitkd.attention.statistics import attention_stats, AttentionStats

#: Name of the union of the shortcut token classes in every statistic.

def mean_z(model, inputs: Tensor, attention_mask: Optional[Tensor] = None, *, batch_size: int = 64) -> list[Tensor]:
    """Per layer, the mean ``z`` over examples at each real position: ``[pos head d_head]`` (mean-ablation values)."""
    L = n_layers(model)
    reducers = {str(layer): Mean(Site(layer, "z"), over_positions=False) for layer in range(L)}
    res = run(model, inputs, attention_mask=attention_mask, reducers=reducers, keep_logits=False,
              batch_size=batch_size)
    return [res.reduced[str(layer)] for layer in range(L)]


def _class_logits(model, out: Tensor, mask: Optional[Tensor]) -> Tensor:
    from circuitkd.models.build import select_class_logits

    return select_class_logits(model, out, mask)


def _ablation_hooks(model, means: Sequence[Tensor], copies: Tensor, B: int) -> list:
    """Edit hooks mean-ablating head ``copies[c]`` (flat ``layer*H + head``; -1 = none) in copy ``c``."""
    H = n_heads(model)
    hooks = []
    for layer in range(n_layers(model)):
        sel = ((copies // H) == layer) & (copies >= 0)
        if not bool(sel.any()):
            continue
        which = torch.nonzero(sel).flatten()
        heads = copies[which] % H

        def edit(act, *, hook, which=which, heads=heads, layer=layer):
            act = act.clone()
            view = act.view(-1, B, *act.shape[1:])  # [copies B pos head d_head]
            P = view.shape[2]
            value = means[layer][:P].to(act.device, act.dtype)  # [pos head d_head]
            w, h = which.to(act.device), heads.to(act.device)
            view[w, :, :, h] = value[:, h].permute(1, 0, 2)[:, None]
            return act

        hooks.append((hook_name(model, Site(layer, "z")), edit))
    return hooks


def ablate_heads(model, inputs: Tensor, attention_mask: Optional[Tensor], *, means: Sequence[Tensor],
                 heads: Optional[Sequence[int]] = None, batch_size: int = 64,
                 rows_per_forward: int = 1024) -> Tensor:
    """Class logits with each head mean-ablated in turn: ``Float[copy batch n_classes]``.

    Copy 0 is the unablated run; copy ``1 + i`` ablates flat head ``heads[i]``
    (``layer * n_heads + head``; default every head). The copies ride in the batch
    dimension of one hooked forward (chunked to ``rows_per_forward`` rows).
    """
    L, H = n_layers(model), n_heads(model)
    flat = torch.arange(L * H) if heads is None else torch.as_tensor(list(heads), dtype=torch.long)
    copies_all = torch.cat([torch.tensor([-1]), flat])
    n = int(inputs.shape[0])
    out = []
    device = model_device(model)
    for lo in range(0, n, batch_size):
        x = inputs[lo:lo + batch_size]
        m = None if attention_mask is None else attention_mask[lo:lo + batch_size]
        B = int(x.shape[0])
        per = max(1, rows_per_forward // B)
        chunks = []
        for c0 in range(0, len(copies_all), per):
            copies = copies_all[c0:c0 + per]
            N = len(copies)
            xs = x.repeat(N, *([1] * (x.dim() - 1)))
            ms = None if m is None else m.repeat(N, 1)
            res = run(model, xs, attention_mask=ms, fwd_hooks=_ablation_hooks(model, means, copies, B),
                      batch_size=N * B)
            logits = _class_logits(model, res.logits, None if ms is None else ms.to(device))
            chunks.append(logits.float().cpu().view(N, B, -1))
        out.append(torch.cat(chunks))
    return torch.cat(out, dim=1)


@dataclass
class ShortcutHeads:
    """Heads ranked by attention to shortcut tokens, with their causal effect on bias-conflicting examples.

    Attributes:
        attention: ``[layer head]`` attention from the read-out position to shortcut tokens.
        ablation_logit_diff: ``[layer head]`` change in the mean logit difference (gold label −
            the label the conflicting shortcut predicts) on bias-conflicting examples when the
            head's ``z`` is mean-ablated (positive: the head pushed towards the shortcut).
        ablation_acc: ``[layer head]`` change in accuracy on those examples.
        patching: ``[layer head]`` or None: with counterfactual shortcut pairs, the fraction
            of the output change caused by flipping the shortcut that patching this head alone
            restores (``circuitkd.patching.patch``, KL metric, denoising).
        base_logit_diff / base_acc: the unablated model on the conflicting examples.
        ranking: every head, most shortcut attention first: ``(layer, head, attention, Δlogit-diff, confirmed)``.
        min_effect: the threshold on ``|Δlogit-diff|`` (or the patching fraction) that confirms one of
            the ``k`` heads with the most shortcut attention.
    """

    attention: Tensor
    ablation_logit_diff: Tensor
    ablation_acc: Tensor
    patching: Optional[Tensor]
    base_logit_diff: float
    base_acc: float
    n_conflicting: int
    ranking: list[tuple[int, int, float, float, bool]]
    min_effect: float
    k: int = 5
    shortcut: tuple[str, ...] = ()

    @property
    def heads(self) -> list[tuple[int, int]]:
        """Confirmed shortcut heads ``(layer, head)``, most shortcut attention first."""
        return [(layer, head) for layer, head, _, _, ok in self.ranking if ok]

    def summary(self, k: int = 3) -> list[str]:
        lines = [f"bias-conflicting examples: {self.n_conflicting}, accuracy {self.base_acc:.3f}, "
                 f"logit diff (gold - shortcut label) {self.base_logit_diff:+.3f}"]
        for layer, head, att, eff, ok in self.ranking[:k]:
            patch = "" if self.patching is None else f", patching {float(self.patching[layer, head]):+.3f}"
            lines.append(f"  {head_name(layer, head)}: shortcut attention {att:.3f}, ablation Δlogit-diff {eff:+.3f}, "
                         f"Δacc {float(self.ablation_acc[layer, head]):+.3f}{patch}"
                         f"{' (confirmed)' if ok else ' (not confirmed)'}")
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "attention": self.attention.tolist(), "ablation_logit_diff": self.ablation_logit_diff.tolist(),
            "ablation_acc": self.ablation_acc.tolist(),
            "patching": None if self.patching is None else self.patching.tolist(),
            "base_logit_diff": self.base_logit_diff, "base_acc": self.base_acc, "n_conflicting": self.n_conflicting,
            "ranking": [list(r) for r in self.ranking], "min_effect": self.min_effect, "k": self.k,
            "shortcut": list(self.shortcut),
            "confirmed": [head_name(*h) for h in self.heads],
        }


def _conflict_labels(data: _Data) -> tuple[Tensor, Tensor]:
    """``(Bool[n] conflicting, Int[n] the label the conflicting shortcut predicts)`` for the shortcut classes."""
    split = data.split
    biases = [b for b in dict.fromkeys(data.bias_of_class.values()) if b is not None] or list(split.bias_labels)
    if not biases:
        raise CircuitKDError("the split has no bias annotations: cannot find bias-conflicting examples")
    conflicting = torch.zeros(len(split), dtype=torch.bool)
    bias_label = torch.full((len(split),), -1, dtype=torch.long)
    for b in biases:
        lab = split.bias_labels[b]
        new = (lab >= 0) & (lab != split.labels) & ~conflicting
        bias_label[new] = lab[new]
        conflicting |= new
    return conflicting, bias_label


def shortcut_heads(model, task: Task | Split, *, split: str = "ood_test", n: Optional[int] = 512,
                   batch_size: int = 64, shortcut: Any = None, k: int = 5, min_effect: float = 0.1,
                   confirm: str = "auto", pairs: Any = None, n_pairs: int = 256, seed: int = 0,
                   metric: MetricArg = "kl", stats: Optional[AttentionStats] = None) -> ShortcutHeads:
    """Rank heads by attention to shortcut tokens and confirm them causally.

    Confirmation (``confirm``): "ablation" mean-ablates each head's ``z`` (means over the
    ``n`` examples) on the bias-conflicting ones, every head at once as stacked copies;
    "patching" also runs :func:`circuitkd.patching.patch` (denoising, ``metric``: a name or a callable
    of the one metric signature, default ``"kl"``) on shortcut pairs (``pairs`` or
    ``task.shortcut_pairs(n_pairs)``); "auto" adds patching when pairs are available.

    A shortcut head must both attend to shortcut tokens and matter: only the ``k`` heads with
    the most shortcut attention are candidates, and a candidate is confirmed when ``|Δlogit-diff|
    >= min_effect`` or its patching fraction is ``>= min_effect``.

    Returns:
        :class:`ShortcutHeads` (``.heads``: confirmed heads; ``.ranking``: every head, most
        shortcut attention first, with its effect).
    """
    if confirm not in ("auto", "ablation", "patching"):
        raise CircuitKDError(f"confirm must be 'auto', 'ablation' or 'patching', got {confirm!r}")
    data = _prepare(task, split, n, shortcut, seed)
    _check_inputs(model, data, "model")
    if stats is None:
        stats = attention_stats(model, data.split, n=None, batch_size=batch_size, shortcut=list(data.shortcut))
    attention = stats.shortcut_attention()
    conflicting, bias_label = _conflict_labels(data)
    n_conf = int(conflicting.sum())
    if n_conf == 0:
        raise CircuitKDError(f"no bias-conflicting examples for shortcut classes {list(data.shortcut)} "
                             f"in split {data.split_name!r}: cannot confirm shortcut heads causally "
                             "(diff_attention(..., confirm='none') skips it)")
    sp = data.split
    means = mean_z(model, sp.inputs, sp.attention_mask, batch_size=batch_size)
    conf = sp.subset(conflicting)
    logits = ablate_heads(model, conf.inputs, conf.attention_mask, means=means, batch_size=batch_size)
    gold, blab = conf.labels, bias_label[conflicting]
    ar = torch.arange(len(gold))
    ld = logits[:, ar, gold] - logits[:, ar, blab]  # [copy n]
    acc = (logits.argmax(-1) == gold).float()
    L, H = stats.n_layers, stats.n_heads
    d_ld = (ld[1:].mean(1) - ld[0].mean()).view(L, H)
    d_acc = (acc[1:].mean(1) - acc[0].mean()).view(L, H)
    patching = None
    want_patch = confirm == "patching" or (confirm == "auto" and (pairs is not None or (
        isinstance(task, Task) and task.pair_fn is not None)))
    if want_patch:
        if pairs is None:
            if not isinstance(task, Task):
                raise CircuitKDError("confirm='patching' needs pairs= or a Task that can draw counterfactual pairs")
            pairs = task.shortcut_pairs(n=n_pairs, seed=seed)
        from circuitkd.patching import patch

        patching = patch(model, pairs, site="head", metric=metric, direction="denoise", batch_size=batch_size)
        patching = patching.float().cpu()
    ranking = []
    for rank, (layer, head, att) in enumerate(_top(attention, L * H)):
        eff = float(d_ld[layer, head])
        causal = abs(eff) >= min_effect or (patching is not None and float(patching[layer, head]) >= min_effect)
        ok = rank < k and causal
        ranking.append((layer, head, float(attention[layer, head]), eff, bool(ok)))
    return ShortcutHeads(attention=attention, ablation_logit_diff=d_ld, ablation_acc=d_acc, patching=patching,
                         base_logit_diff=float(ld[0].mean()), base_acc=float(acc[0].mean()), n_conflicting=n_conf,
                         ranking=ranking, min_effect=min_effect, k=k, shortcut=data.shortcut)

