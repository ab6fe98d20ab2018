"""Patching sites, the components a sweep patches, the checks every patching function runs, and
the direction and normalisation of an effect."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from circuitkd.engine import forward, model_device
from circuitkd.errors import CircuitKDError
from circuitkd.hooks import Site, backbone_of, capture_hooks, edit_hooks, has_mlp, hook_name, n_layers
from circuitkd.models.pair import layer_map as depth_layer_map
from circuitkd.types import Direction, PromptPairs


@dataclass(frozen=True)
class PatchSite:
    """A patchable site family: the activation ``kind`` and the axes its result has."""

    name: str
    kind: str
    axes: tuple[str, ...]

    @property
    def by_pos(self) -> bool:
        return "pos" in self.axes

    @property
    def by_head(self) -> bool:
        return "head" in self.axes


_SITE_LIST = [
    PatchSite("resid", "resid_pre", ("layer", "pos")),
    PatchSite("resid_pre", "resid_pre", ("layer", "pos")),
    PatchSite("resid_mid", "resid_mid", ("layer", "pos")),
    PatchSite("resid_post", "resid_post", ("layer", "pos")),
    PatchSite("attn_out", "attn_out", ("layer", "pos")),
    PatchSite("attn_out_layer", "attn_out", ("layer",)),
    PatchSite("mlp_out", "mlp_out", ("layer", "pos")),
    PatchSite("mlp_out_layer", "mlp_out", ("layer",)),
    PatchSite("head", "z", ("layer", "head")),
    PatchSite("head_pos", "z", ("layer", "head", "pos")),
] + [
    PatchSite(f"{k}{suffix}", k, ("layer", "head") + (("pos",) if suffix else ()))
    for k in ("q", "k", "v", "pattern") for suffix in ("", "_pos")
]


SITES: dict[str, PatchSite] = {s.name: s for s in _SITE_LIST}


def get_site(name: str) -> PatchSite:
    if name not in SITES:
        raise CircuitKDError(f"unknown patching site {name!r}; expected one of {sorted(SITES)}")
    return SITES[name]


@dataclass
class Cells:
    """The components to patch: one row ``(layer, head, pos)`` each (-1 = not indexed)."""

    layer: Tensor
    head: Tensor
    pos: Tensor
    shape: tuple[int, ...]

    def __len__(self) -> int:
        return int(self.layer.shape[0])


def make_cells(site: PatchSite, L: int, H: int, P: int, layers: Optional[Sequence[int]],
                heads: Optional[Sequence[int]], positions: Optional[Sequence[int]]) -> tuple[Cells, list]:
    layers = list(range(L)) if layers is None else list(layers)
    for layer in layers:
        if not 0 <= layer < L:
            raise CircuitKDError(f"layer {layer} out of range; the model has {L} layers")
    heads = list(range(H)) if heads is None else list(heads)
    for h in heads:
        if not 0 <= h < H:
            raise CircuitKDError(f"head index {h} out of range; the model has {H} heads per layer")
    positions = list(range(P)) if positions is None else list(positions)
    for p in positions:
        if not 0 <= p < P:
            raise CircuitKDError(f"position {p} out of range; inputs have {P} positions")
    grids = [layers]
    if site.by_head:
        grids.append(heads)
    if site.by_pos:
        grids.append(positions)
    mesh = torch.cartesian_prod(*[torch.tensor(g, dtype=torch.long) for g in grids]).reshape(-1, len(grids))
    cols = {"layer": mesh[:, 0]}
    i = 1
    for axis in ("head", "pos"):
        if axis in site.axes:
            cols[axis] = mesh[:, i]
            i += 1
        else:
            cols[axis] = torch.full((mesh.shape[0],), -1, dtype=torch.long)
    shape = tuple(len(g) for g in grids)
    return Cells(cols["layer"], cols["head"], cols["pos"], shape), grids


def check_kind(model, site: PatchSite) -> None:
    if site.kind == "mlp_out" and not has_mlp(model):
        raise CircuitKDError(f"site {site.name!r}: this attention-only model has no MLP")
    if site.kind == "pattern":
        hook_name(model, Site(0, "pattern"))  # raises for HF attention


def n_positions(model, pairs: PromptPairs) -> int:
    if backbone_of(model) == "vit":
        cfg = getattr(model, "circuitkd_spec", None)
        if cfg is not None:
            return (cfg.image_size // cfg.patch_size) ** 2 + 1
        with torch.inference_mode():
            store: dict = {}
            with edit_hooks(model, capture_hooks(model, [Site(0, "resid_pre")], store)):
                forward(model, pairs.clean[:1].to(model_device(model)))
            return int(store[Site(0, "resid_pre")].shape[1])
    return int(pairs.clean.shape[1])


def check_cross(target, source, layer_map: Optional[Sequence[int]]) -> list[int]:
    """The source layer of each target layer (default: evenly spaced by depth), checked against both models."""
    if backbone_of(target) != backbone_of(source):
        raise CircuitKDError(
            f"cross-model patching needs one backbone: target is {backbone_of(target)}, source {backbone_of(source)}"
        )
    for attr in ("d_model", "n_heads", "d_head"):
        a, b = int(getattr(target.cfg, attr)), int(getattr(source.cfg, attr))
        if a != b:
            raise CircuitKDError(f"cross-model patching needs matching shapes: target {attr}={a}, source {attr}={b}")
    lmap = depth_layer_map(n_layers(source), n_layers(target)) if layer_map is None else list(layer_map)
    if len(lmap) != n_layers(target):
        raise CircuitKDError(f"layer_map has {len(lmap)} entries; the target model has {n_layers(target)} layers")
    for i, j in enumerate(lmap):
        if not 0 <= j < n_layers(source):
            raise CircuitKDError(f"layer_map[{i}]={j} out of range; the source model has {n_layers(source)} layers")
    return lmap


def direction_inputs(pairs: PromptPairs, direction: Direction) -> tuple[Tensor, Tensor]:
    """``(base input, source input)``: denoising patches clean activations into the corrupt run."""
    return (pairs.corrupt, pairs.clean) if direction is Direction.DENOISE else (pairs.clean, pairs.corrupt)


def normalise_effect(values: Tensor, m_clean: float, m_corrupt: float) -> Tensor:
    denom = m_clean - m_corrupt
    if abs(denom) < 1e-8:
        raise CircuitKDError(
            f"cannot normalise: the metric is the same on clean ({m_clean:.6g}) and corrupt ({m_corrupt:.6g}) "
            "runs; pass normalise=False"
        )
    return (values - m_corrupt) / denom
