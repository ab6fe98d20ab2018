"""Activation patching, path patching, cross-model patching and attribution patching.

Activation patching (causal tracing, Meng et al. 2022, "Locating and Editing Factual
Associations in GPT"; practice after Heimersheim & Nanda 2024, "How to use and interpret
activation patching") runs a model on a *clean* and a *corrupt* input and, for one
component at a time, swaps that component's activation between the runs:

- ``direction="denoise"``: the corrupt run with one clean activation (is it *sufficient*?);
- ``direction="noise"``: the clean run with one corrupt activation (is it *necessary*?).

The metric (default: the logit difference between ``pairs.clean_answer`` and
``pairs.corrupt_answer`` read at ``pairs.position``) is averaged over pairs and, with
``normalise=True``, reported as ``(m - m_corrupt) / (m_clean - m_corrupt)``: 1 means the
patched run behaves like the clean run, 0 like the corrupt one, in both directions.

Path patching (Wang et al. 2022, "Interpretability in the Wild", IOI) measures one sender
head's effect through chosen receivers only: every other component is frozen to the base
run while the sender is patched, the receivers' q/k/v (or the classifier read-out) are
recomputed and recorded, then patched alone into a fresh base run.

Cross-model patching (:func:`cross_patch`, teacher first) moves activations from a teacher
into a student of matching width (one initialised from it) at matched layers, on the same
inputs, to localise what distillation changed.

Attribution patching (Nanda 2023, "Attribution Patching: Activation Patching At
Industrial Scale") is the first-order screen: one forward and one backward give
``grad · (source − base)`` for every site at once.

Modules: :mod:`~circuitkd.patching.sites` (sites, cells, checks, direction, normalisation),
:mod:`~circuitkd.patching.hooked` (the setter table and the hooked executors),
:mod:`~circuitkd.patching.fast` (the native fast path), :mod:`~circuitkd.patching.activation`
(:func:`patch`, :func:`patch_result`, :func:`cross_patch`), :mod:`~circuitkd.patching.path`
and :mod:`~circuitkd.patching.attribution`.

How it is fast. Three executors compute the same numbers:

- ``method="reference"``: one hooked bridge forward per component — slow and obvious,
  for tests.
- ``method="stacked"``: many patched copies ride in the batch dimension of one hooked
  bridge forward (copy index × example), in chunks of ``copies_per_forward`` — any
  backbone, the way to use a GPU.
- ``method="fast"`` (native encoders and causal native models): the one native forward
  (:mod:`circuitkd.native`, checked equal to the bridge to 1e-5 in the tests), resumed from
  the patched layer, recomputing nothing that cannot change. It starts from the cached base activations at the
  patched layer; while a patch has changed one position only, it recomputes that
  position alone (MLPs are position-wise; q/k/v of the other positions are cached);
  the next attention computes q/k/v at that position only and updates every query's
  scores and output for the one changed key/value column; from there on it recomputes
  every position (in the cache's reused scratch buffers, a block of rows at a time);
  and in the last layer it computes only the read-out position (a last-layer patch
  elsewhere changes nothing there). The clean and corrupt runs are done once per batch
  and reused by every patched copy.

``method="auto"`` picks ``fast`` where it applies, else ``stacked``.

Per-head outputs exclude ``b_O`` (see :mod:`circuitkd.hooks`); patching a head's output
is patching its ``z`` (the output is linear in ``z``), except across models, where the
source head's output ``z_src @ W_O_src`` replaces the target head's ``z @ W_O``.
"""
from circuitkd.patching.activation import PatchResult, cross_patch, patch, patch_result
from circuitkd.patching.attribution import attribution_patch, correlation
from circuitkd.patching.path import path_patch
from circuitkd.patching.sites import SITES, PatchSite

__all__ = ["SITES", "PatchResult", "PatchSite", "attribution_patch", "correlation", "cross_patch", "patch",
           "patch_result", "path_patch"]
