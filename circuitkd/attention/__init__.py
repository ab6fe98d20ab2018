"""Attention statistics, shortcut heads, and teacher-vs-student head matching and CKA.

Three tools trace a distilled student's lost robustness to attention:

- **Per-head attention statistics**, streamed over a dataset in the manner of Clark et al.
  2019, "What Does BERT Look At? An Analysis of BERT's Attention": the attention mass each
  head sends from the read-out position (CLS) and from every position to each token class
  the task marks (overlap, negation and cue words, premise vs hypothesis; for images the
  coloured patches), the entropy of its attention, premise↔hypothesis alignment (a
  hypothesis token attending to the same word in the premise) and previous-, next- and
  duplicate-token scores.
- **Shortcut heads**: heads ranked by their attention to the shortcut tokens and confirmed
  causally — each head's ``z`` is mean-ablated on the bias-conflicting examples (all heads
  at once, as copies stacked in the batch dimension) and, where the task can draw
  counterfactual pairs, activation-patched with :func:`circuitkd.patching.patch`.
- **Teacher vs student**: every pair of heads is compared by the similarity of their
  patterns on the same inputs (1 − Jensen–Shannon divergence / ln 2, or the Pearson
  correlation of the patterns), student heads are matched to teacher heads one-to-one with
  the Hungarian method (Kuhn 1955, "The Hungarian Method for the Assignment Problem";
  rectangular when the head counts differ) or greedily, and residual streams are compared
  layer by layer with linear CKA (Kornblith et al. 2019, "Similarity of Neural Network
  Representations Revisited"), which handles different widths.

Everything is a streaming reduction over batches run by :func:`circuitkd.engine.run`:
memory does not grow with the number of examples.

Modules: :mod:`~circuitkd.attention.common` (prepared data, batching, positions),
:mod:`~circuitkd.attention.statistics`, :mod:`~circuitkd.attention.similarity` (pattern
similarity, matching, CKA), :mod:`~circuitkd.attention.shortcut_heads` and
:mod:`~circuitkd.attention.diff`.

Example::

    diff = ckd.diff_attention(teacher, student, task)
    print("\\n".join(diff.summary()))
    diff.matching[0]        # ((teacher layer, head), (student layer, head), similarity)
"""

from circuitkd.attention.common import SHORTCUT, head_name, position_masks
from circuitkd.attention.diff import AttentionDiff, ExamplePatterns, diff_attention
from circuitkd.attention.shortcut_heads import ShortcutHeads, ablate_heads, mean_z, shortcut_heads
from circuitkd.attention.similarity import linear_cka, match_heads
from circuitkd.attention.statistics import AttentionStats, attention_stats

__all__ = ["SHORTCUT", "AttentionDiff", "AttentionStats", "ExamplePatterns", "ShortcutHeads", "ablate_heads",
           "attention_stats", "diff_attention", "head_name", "linear_cka", "match_heads", "mean_z",
           "position_masks", "shortcut_heads"]
