"""Debiasing objectives, selected by name, for text and image tasks alike.

Each method is a pure loss over tensors (tested against hand-computed values) plus a
factory, :func:`make_objective`, that precomputes what the loss needs per training example
(bias-only probabilities, a plain teacher's predictions, JTT's error set) and returns a
``loss_fn(model, batch, step)`` for :func:`circuitkd.train.loop.train_loop`.

Methods (``METHODS``):

* ``reweight`` — example reweighting, weight ``1 - p_bias(y)`` (Clark, Yatskar & Zettlemoyer
  2019, arXiv 1909.03683; Schuster et al. 2019), normalised by the batch's total weight.
* ``poe`` — product of experts: cross-entropy on ``softmax(log p_main + log p_bias)``
  (Clark et al. 2019; He, Zha & Wang 2019; Karimi Mahabadi, Belinkov & Henderson 2020).
* ``learned_mixin_h`` — learned-mixin + H (Clark et al. 2019): ``softmax(log p_main +
  g(x) log p_bias)`` with ``g(x) = softplus(w · h_x + b)`` learned from the model's final
  hidden state, plus ``w_H`` times the entropy of ``softmax(g(x) log p_bias)`` so the model
  cannot switch the bias off by driving ``g`` to 0.
* ``focal`` — debiased focal loss ``(1 - p_bias(y))^γ · CE`` (Karimi Mahabadi et al. 2020,
  arXiv 1909.06321).
* ``confreg`` — confidence regularisation (Utama, Moosavi & Gurevych 2020a, arXiv 2005.00315):
  self-distillation from a plainly trained teacher whose probabilities are scaled by the
  bias strength, ``S(p_t, β)_j ∝ p_t,j^(1-β)`` with ``β = p_bias(y)``.
* ``group_dro`` — online Group DRO (Sagawa, Koh, Hashimoto & Liang 2020, arXiv 1911.08731):
  exponentiated-gradient weights ``q_g ∝ q_g exp(η L_g)`` over the task's groups, loss
  ``Σ_g q_g L_g`` (optionally with the generalisation adjustment ``C/√n_g``).
* ``jtt`` — Just Train Twice (Liu et al. 2021, arXiv 2107.09044): a briefly trained ERM model
  marks the training examples it gets wrong; the final model upweights them by ``λ_up``
  (a weighted loss, equal in expectation to upsampling them ``λ_up`` times).

The bias-only model the bias-product methods use is chosen by ``DebiasCfg.bias`` or a
suffix on the name: ``"poe:unknown"`` (Utama et al. 2020b's shallow model), ``"focal:overlap"``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from circuitkd.config import DebiasCfg, TrainCfg
from circuitkd.data.task import Split, Task
from circuitkd.errors import CircuitKDError
from circuitkd.models.build import model_device, read_positions, select_class_logits, spec_of, uses_native_forward
from circuitkd.native import class_logits_native
from circuitkd.train.loop import Batch, LossFn

# --------------------------------------------------------------------------- pure losses


def _gold(probs: Tensor, labels: Tensor) -> Tensor:
    return probs.gather(1, labels[:, None]).squeeze(1)


def reweight_loss(logits: Float[Tensor, "batch n_classes"], labels: Int[Tensor, " batch"],
                  bias_probs: Float[Tensor, "batch n_classes"]) -> Tensor:
    """``Σ_i w_i CE_i / Σ_i w_i`` with ``w_i = 1 - p_bias(y_i)``."""
    weights = 1.0 - _gold(bias_probs, labels)
    ce = F.cross_entropy(logits, labels, reduction="none")
    return (weights * ce).sum() / weights.sum().clamp_min(1e-12)


def poe_loss(logits: Float[Tensor, "batch n_classes"], labels: Int[Tensor, " batch"],
             bias_probs: Float[Tensor, "batch n_classes"]) -> Tensor:
    """Cross-entropy of ``softmax(log_softmax(logits) + log p_bias)``."""
    combined = F.log_softmax(logits, dim=-1) + bias_probs.log()
    return F.cross_entropy(combined, labels)


def learned_mixin_h_loss(logits: Float[Tensor, "batch n_classes"], labels: Int[Tensor, " batch"],
                         bias_probs: Float[Tensor, "batch n_classes"], gate: Float[Tensor, " batch"],
                         entropy_weight: float) -> Tensor:
    """Learned-mixin + H: CE of ``softmax(log p_main + g·log p_bias)`` + ``w_H · H(softmax(g·log p_bias))``.

    ``gate`` is ``g(x) >= 0`` per example (a softplus of a learned projection).
    """
    scaled_bias = gate[:, None] * bias_probs.log()
    combined = F.log_softmax(logits, dim=-1) + scaled_bias
    loss = F.cross_entropy(combined, labels)
    if entropy_weight:
        log_q = F.log_softmax(scaled_bias, dim=-1)
        entropy = -(log_q.exp() * log_q).sum(dim=-1).mean()
        loss = loss + entropy_weight * entropy
    return loss


def focal_loss(logits: Float[Tensor, "batch n_classes"], labels: Int[Tensor, " batch"],
               bias_probs: Float[Tensor, "batch n_classes"], gamma: float) -> Tensor:
    """Debiased focal loss: mean of ``(1 - p_bias(y))^γ · CE``."""
    weights = (1.0 - _gold(bias_probs, labels)) ** gamma
    return (weights * F.cross_entropy(logits, labels, reduction="none")).mean()


def scaled_teacher_probs(teacher_probs: Float[Tensor, "batch n_classes"], labels: Int[Tensor, " batch"],
                         bias_probs: Float[Tensor, "batch n_classes"]) -> Float[Tensor, "batch n_classes"]:
    """Utama et al. (2020a)'s ``S(p_t, β)_j = p_t,j^(1-β) / Σ_k p_t,k^(1-β)``, ``β = p_bias(y)``."""
    beta = _gold(bias_probs, labels)
    scaled = teacher_probs.clamp_min(1e-12) ** (1.0 - beta)[:, None]
    return scaled / scaled.sum(dim=-1, keepdim=True)


def confreg_loss(logits: Float[Tensor, "batch n_classes"], labels: Int[Tensor, " batch"],
                 bias_probs: Float[Tensor, "batch n_classes"],
                 teacher_probs: Float[Tensor, "batch n_classes"]) -> Tensor:
    """Cross-entropy between the bias-scaled teacher distribution and the model's: ``-Σ_j S_j log p_j``."""
    target = scaled_teacher_probs(teacher_probs, labels, bias_probs)
    return -(target * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def group_dro_step(per_example_loss: Float[Tensor, " batch"], groups: Int[Tensor, " batch"], q: Tensor,
                   eta: float, adjustment: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """One online Group DRO step: returns ``(Σ_g q'_g L_g, q')`` with ``q'_g ∝ q_g exp(η (L_g + adj_g))``.

    ``L_g`` is the mean loss of group ``g`` in the batch (0 for groups absent from it, whose
    weight then only changes through renormalisation, as in Sagawa et al.'s code).
    """
    n_groups = q.shape[0]
    onehot = F.one_hot(groups, n_groups).float()
    counts = onehot.sum(dim=0)
    group_loss = (onehot * per_example_loss[:, None]).sum(dim=0) / counts.clamp_min(1.0)
    step_loss = group_loss.detach()
    if adjustment is not None:
        step_loss = step_loss + adjustment
    new_q = q * torch.exp(eta * step_loss)
    new_q = new_q / new_q.sum()
    return (new_q * group_loss).sum(), new_q


def upweighted_loss(logits: Float[Tensor, "batch n_classes"], labels: Int[Tensor, " batch"],
                    weights: Float[Tensor, " batch"], mean_weight: float) -> Tensor:
    """JTT's objective: ``mean(w · CE) / E[w]``, with ``E[w]`` over the whole training split.

    Dividing by the dataset's mean weight (not the batch's) makes this the upsampled
    dataset's loss in expectation.
    """
    return (weights * F.cross_entropy(logits, labels, reduction="none")).mean() / mean_weight


# ------------------------------------------------------------------------- objectives


@dataclass(frozen=True)
class Method:
    name: str
    paper: str
    uses_bias_model: bool
    build: Callable[..., tuple[LossFn, list]]


class Objective:
    """A debiasing loss ``(model, batch, step) -> scalar`` together with the state it trains with.

    Two kinds of state, both part of a partial checkpoint (see :func:`circuitkd.train.loop.train_loop`),
    so an interrupted run resumes bit for bit without recomputing anything:

    * ``tables``: per-example quantities fixed before the first step and indexed by
      ``batch.index`` (bias-only probabilities ``[n, n_classes]``, the plain teacher's
      probabilities ``[n, n_classes]``, JTT's error set ``[n]``). Computing them may train an
      auxiliary model, so it happens once, in :meth:`prepare` (the loop calls it before the
      first step of a fresh run; a resumed run loads them instead).
    * ``state``: tensors the loss updates as it trains (Group DRO's group weights ``q``).

    Parameters the loss trains (learned-mixin's gate) are not held here: they are returned by
    :func:`make_objective` and the loop saves them with the optimiser state.
    """

    def __init__(self, method: str, options: DebiasCfg, n_examples: int,
                 tables: Callable[[], dict[str, Tensor]],
                 loss: Callable[["Objective", Any, Batch, int], Tensor],
                 state: Optional[dict[str, Tensor]] = None):
        self.method, self.options, self.n_examples = method, options, n_examples
        self._compute_tables, self._loss = tables, loss
        self.tables: Optional[dict[str, Tensor]] = None
        self.state: dict[str, Tensor] = dict(state or {})

    def prepare(self) -> None:
        """Compute the per-example tables (once)."""
        if self.tables is None:
            self.tables = self._compute_tables()

    def __call__(self, model, batch: Batch, step: int) -> Tensor:
        self.prepare()
        return self._loss(self, model, batch, step)

    def _table(self, name: str) -> Tensor:
        self.prepare()
        if name not in self.tables:
            raise AttributeError(f"the {self.method} objective has no {name} table")
        return self.tables[name]

    @property
    def bias_probs(self) -> Float[Tensor, "n n_classes"]:
        """The bias-only model's probabilities per training example."""
        return self._table("bias_probs")

    @property
    def teacher_probs(self) -> Float[Tensor, "n n_classes"]:
        """confreg: the plain teacher's probabilities per training example."""
        return self._table("teacher_probs")

    @property
    def error_set(self) -> Tensor:
        """JTT: ``Bool[n]``, the examples the identification model got wrong."""
        return self._table("error_set")

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue training: method, options, tables and state (on CPU)."""
        self.prepare()
        return {"method": self.method, "options": self.options.to_dict(),
                "tables": {k: v.detach().cpu().clone() for k, v in self.tables.items()},
                "state": {k: v.detach().cpu().clone() for k, v in self.state.items()}}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; a CircuitKDError when it belongs to another method or split."""
        if not isinstance(saved, dict) or not {"method", "options", "tables", "state"} <= set(saved):
            raise CircuitKDError(f"saved state of debiasing method {self.method!r} is damaged "
                                 f"(keys {sorted(saved) if isinstance(saved, dict) else type(saved).__name__})")
        if saved["method"] != self.method or saved["options"] != self.options.to_dict():
            raise CircuitKDError(
                f"saved training state belongs to debiasing method {saved['method']!r} with options "
                f"{saved['options']}, not {self.method!r} with {self.options.to_dict()}"
            )
        tables = dict(saved["tables"])
        wrong = {k: tuple(v.shape) for k, v in tables.items() if v.shape[0] != self.n_examples}
        if wrong:
            raise CircuitKDError(f"saved {self.method} tables {wrong} do not cover the {self.n_examples} "
                                 "training examples of this run")
        if set(saved["state"]) != set(self.state):
            raise CircuitKDError(f"saved {self.method} state holds {sorted(saved['state'])}, "
                                 f"expected {sorted(self.state)}")
        self.tables = tables
        self.state = {k: v.to(self.state[k].device, self.state[k].dtype) for k, v in saved["state"].items()}


def _parse(name: str, options: DebiasCfg) -> tuple[str, DebiasCfg]:
    if not isinstance(name, str):
        raise CircuitKDError(f"debiasing method must be a name, got {type(name).__name__}")
    base, _, bias = name.partition(":")
    if base not in METHODS:
        raise CircuitKDError(f"unknown debiasing method {name!r}; known methods: {', '.join(['none', *METHODS])}")
    if bias:
        if not METHODS[base].uses_bias_model:
            raise CircuitKDError(f"method {base!r} uses no bias-only model, so {name!r} names one it cannot use")
        options = options.replace(bias=bias)
    return base, options


def _bias_probs(task, split, model, options: DebiasCfg, cfg: TrainCfg, seed: int) -> Tensor:
    from circuitkd.train.bias_models import bias_probs, known_bias_probs

    if options.bias == "unknown":
        return bias_probs(task, "unknown", spec=spec_of(model), split=split, seed=seed, cfg=cfg,
                          unknown_examples=options.unknown_examples, unknown_steps=options.unknown_steps,
                          device=model_device(model))
    return known_bias_probs(task, options.bias, split=split, l2=options.bias_model_l2)


def _lookup(table: Tensor, batch: Batch) -> Tensor:
    return table[batch.index.to(table.device)].to(batch.labels.device)


def _bias_product(name: str, loss: Callable[..., Tensor], **kw) -> Callable[..., tuple[LossFn, list]]:
    def build(task, split, model, *, cfg, seed, options, teacher=None):
        extra = {k: getattr(options, v) for k, v in kw.items()}

        def tables() -> dict[str, Tensor]:
            return {"bias_probs": _bias_probs(task, split, model, options, cfg, seed)}

        def loss_fn(obj: Objective, model, batch: Batch, step: int) -> Tensor:
            return loss(batch.logits(model), batch.labels, _lookup(obj.tables["bias_probs"], batch), **extra)

        return Objective(name, options, len(split), tables, loss_fn), []

    return build


def _hidden_and_logits(model, batch: Batch) -> tuple[Tensor, Tensor]:
    """The classifier's input (final hidden state at the read position) and the class logits."""
    if uses_native_forward(model):
        logits, hidden = class_logits_native(model, batch.inputs, batch.attention_mask,
                                             read_positions(model, batch.inputs, batch.attention_mask),
                                             return_hidden=True)
        return hidden, logits
    seen: dict[str, Tensor] = {}

    def grab(module, args):
        seen["hidden"] = args[0]

    handle = model.unembed.register_forward_pre_hook(grab)
    try:
        logits = batch.logits(model)
    finally:
        handle.remove()
    hidden = seen["hidden"]
    if hidden.dim() == 3:
        hidden = select_class_logits(model, hidden, batch.attention_mask)
    return hidden, logits


def _build_lmh(task, split, model, *, cfg, seed, options, teacher=None):
    d_model = spec_of(model).d_model
    gate = torch.nn.Linear(d_model, 1).to(model_device(model))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.nn.init.normal_(gate.weight, std=0.02)
    torch.nn.init.zeros_(gate.bias)

    def tables() -> dict[str, Tensor]:
        return {"bias_probs": _bias_probs(task, split, model, options, cfg, seed)}

    def loss_fn(obj: Objective, model, batch: Batch, step: int) -> Tensor:
        hidden, logits = _hidden_and_logits(model, batch)
        g = F.softplus(gate(hidden.float())).squeeze(-1)
        return learned_mixin_h_loss(logits, batch.labels, _lookup(obj.tables["bias_probs"], batch), g,
                                    options.lmh_entropy_weight)

    objective = Objective("learned_mixin_h", options, len(split), tables, loss_fn)
    objective.gate = gate  # type: ignore[attr-defined]
    return objective, list(gate.parameters())


def _build_confreg(task, split, model, *, cfg, seed, options, teacher=None):
    def tables() -> dict[str, Tensor]:
        from circuitkd.evaluate import predict_logits

        plain = teacher
        if plain is None:
            # Utama et al. distil from a plainly trained model of the same kind: train one.
            from circuitkd.models.build import build_model
            from circuitkd.train.loop import train_loop

            plain = build_model(spec_of(model).replace(seed=seed), task, device=model_device(model))
            train_loop(plain, task.train, cfg.replace(checkpoint_every=0), desc="confreg: plain teacher")
        return {"bias_probs": _bias_probs(task, split, model, options, cfg, seed),
                "teacher_probs": torch.softmax(predict_logits(plain, split), dim=-1)}

    def loss_fn(obj: Objective, model, batch: Batch, step: int) -> Tensor:
        return confreg_loss(batch.logits(model), batch.labels, _lookup(obj.tables["bias_probs"], batch),
                            _lookup(obj.tables["teacher_probs"], batch))

    return Objective("confreg", options, len(split), tables, loss_fn), []


def _build_group_dro(task, split, model, *, cfg, seed, options, teacher=None):
    n_groups = max(len(task.group_names), int(split.groups.max()) + 1)
    device = model_device(model)
    adjustment = None
    if options.dro_adjustment:
        counts = torch.bincount(split.groups, minlength=n_groups).float().clamp_min(1.0)
        adjustment = (options.dro_adjustment / counts.sqrt()).to(device)

    def loss_fn(obj: Objective, model, batch: Batch, step: int) -> Tensor:
        per_example = F.cross_entropy(batch.logits(model), batch.labels, reduction="none")
        loss, obj.state["q"] = group_dro_step(per_example, batch.groups, obj.state["q"], options.dro_eta, adjustment)
        return loss

    return Objective("group_dro", options, len(split), dict, loss_fn,
                     state={"q": torch.full((n_groups,), 1.0 / n_groups, device=device)}), []


def jtt_error_set(task, split: Split, model, *, cfg: TrainCfg, seed: int, id_frac: float) -> Tensor:
    """``Bool[n]``: examples of ``split`` a briefly trained ERM copy of ``model`` misclassifies."""
    from circuitkd.evaluate import predict_logits
    from circuitkd.models.build import build_model
    from circuitkd.train.loop import train_loop

    id_steps = max(1, int(round(id_frac * cfg.steps)))
    id_model = build_model(spec_of(model).replace(seed=seed + 2), task, device=model_device(model))
    train_loop(id_model, task.train, cfg.replace(steps=id_steps, seed=seed + 2, checkpoint_every=0),
               desc="jtt: identification model")
    return predict_logits(id_model, split).argmax(-1) != split.labels


def _build_jtt(task, split, model, *, cfg, seed, options, teacher=None):
    def tables() -> dict[str, Tensor]:
        return {"error_set": jtt_error_set(task, split, model, cfg=cfg, seed=seed, id_frac=options.jtt_id_frac)}

    def loss_fn(obj: Objective, model, batch: Batch, step: int) -> Tensor:
        weights = torch.where(obj.tables["error_set"], torch.tensor(options.jtt_upweight), torch.tensor(1.0))
        # E[w] over the whole split: the upsampled dataset's loss in expectation.
        return upweighted_loss(batch.logits(model), batch.labels, _lookup(weights, batch), float(weights.mean()))

    return Objective("jtt", options, len(split), tables, loss_fn), []


METHODS: dict[str, Method] = {
    "reweight": Method("reweight", "Clark et al. 2019; Schuster et al. 2019", True,
                        _bias_product("reweight", reweight_loss)),
    "poe": Method("poe", "Clark et al. 2019; He et al. 2019; Karimi Mahabadi et al. 2020", True,
                  _bias_product("poe", poe_loss)),
    "learned_mixin_h": Method("learned_mixin_h", "Clark et al. 2019", True, _build_lmh),
    "focal": Method("focal", "Karimi Mahabadi et al. 2020", True, _bias_product("focal", focal_loss, gamma="focal_gamma")),
    "confreg": Method("confreg", "Utama et al. 2020a", True, _build_confreg),
    "group_dro": Method("group_dro", "Sagawa et al. 2020", False, _build_group_dro),
    "jtt": Method("jtt", "Liu et al. 2021", False, _build_jtt),
}


def method_names() -> list[str]:
    return list(METHODS)


def make_objective(name: str, task: Task, model, *, cfg: Optional[TrainCfg] = None, seed: int = 0,
                   split: Optional[Split] = None, teacher: Any = None,
                   options: Optional[DebiasCfg | dict] = None) -> tuple[LossFn, list]:
    """The loss of debiasing method ``name`` and the extra parameters it trains (learned-mixin's gate).

    Args:
        name: a key of :data:`METHODS`, optionally with a bias-model suffix ("poe:unknown").
        task: the task (bias annotations, groups).
        model: the model that will be trained (its spec sizes the shallow / identification models).
        cfg: the training config (the identification and plain-teacher models reuse it).
        seed: seeds the auxiliary models.
        split: the split the loss will be trained on (``batch.index`` refers to it);
            ``task.train`` by default, or e.g. train + augmentation when distilling.
        teacher: for ``confreg``, an already trained plain model to self-distil from
            (trained here with ``cfg`` when None).
        options: :class:`DebiasCfg` (or a dict of its fields).
    """
    if isinstance(options, dict):
        options = DebiasCfg.from_dict(options)
    base, options = _parse(name, options or DebiasCfg())
    cfg = cfg or TrainCfg()
    split = task.train if split is None else split
    return METHODS[base].build(task, split, model, cfg=cfg, seed=seed, options=options, teacher=teacher)
