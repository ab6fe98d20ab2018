"""Tests written for mutants of circuitkd/attention/ that the suite let live (docs/testing.md lists them).

Pattern correlation against a hand-computed Pearson coefficient, and linear CKA's invariance to
scale on representations whose norms are far below 1 (the mutants zeroed or distorted both).
"""
import torch

from circuitkd.attention.similarity import _PairSimilarity, linear_cka


def test_pattern_correlation_is_pearsons_over_real_entries():
    """Kills: a variance clamped at 1 instead of 0 (attention weights have variances far below 1)."""
    g = torch.Generator().manual_seed(0)
    # near-uniform rows, as in a barely trained model: the summed squared deviations stay below 1
    ps = torch.softmax(0.3 * torch.randn(3, 2, 5, 5, generator=g), -1)
    pt = torch.softmax(0.3 * torch.randn(3, 2, 5, 5, generator=g), -1)
    acc = _PairSimilarity(2, 2)
    acc.update(ps, pt, torch.ones(3, 5))
    got = acc.correlation()
    for s in range(2):
        for t in range(2):
            want = torch.corrcoef(torch.stack([ps[:, s].flatten(), pt[:, t].flatten()]))[0, 1]
            assert abs(float(got[s, t]) - float(want)) < 1e-5, (s, t)


def test_linear_cka_is_one_for_identical_small_representations():
    """Kills: CKA returning 0 whenever the denominator is below 1 instead of at 0."""
    x = torch.randn(20, 4, generator=torch.Generator().manual_seed(1)) * 1e-3
    assert abs(linear_cka(x, x) - 1.0) < 1e-5
    assert abs(linear_cka(x, 3.0 * x) - 1.0) < 1e-5


def test_diff_attention_uses_n_examples_and_records_its_settings():
    """Kills: diff_attention ignoring ``n`` (every example of the split), and saving the similarity
    measure under another key."""
    from circuitkd.attention import diff_attention
    from tests.test_attention import nli_like_task, tiny

    task, model = nli_like_task(8), tiny(n_layers=1, n_heads=2)
    diff = diff_attention(model, model, task, n=3, confirm="none", similarity="corr")
    assert len(task.split("ood_test")) > 3 and diff.info["n"] == 3
    assert diff.info["similarity"] == "corr" and diff.info["cka_positions"] == "all"
