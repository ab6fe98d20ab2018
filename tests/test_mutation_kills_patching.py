"""Tests written for mutants of circuitkd/patching/ that the suite let live (docs/testing.md lists them).

The path-patching receiver's value port is checked against hand-written hooks in
tests/test_path_patching_reference.py; here, the position count of a ViT that carries no circuitkd
spec (a bridge built elsewhere), which is measured with a hook instead of read off the spec.
"""
import torch

from circuitkd.patching.sites import n_positions
from tests.circuits.conftest import build, image_pairs


def test_a_vit_without_a_circuitkd_spec_has_its_positions_measured():
    """Kills: n_positions capturing a site that does not exist when it has to run the model."""
    model = build("vit")
    pairs = image_pairs()
    assert n_positions(model, pairs) == (8 // 4) ** 2 + 1
    del model.circuitkd_spec  # now only the bridge config says it is a ViT
    assert not hasattr(model, "circuitkd_spec")
    assert n_positions(model, pairs) == 5
    assert torch.equal(pairs.clean, image_pairs().clean)  # the measurement leaves the pairs alone
