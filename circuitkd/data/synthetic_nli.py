"""Synthetic NLI with switchable, mixable shortcut features of controlled strength.

Premise/hypothesis pairs come from templates over a closed world shipped in
``resources/synthetic_nli_lexicon.json``: entities, verb concepts with a synonym and an
antonym concept, and decoration words. The gold label is a function of structure alone:

* hypothesis roles differ from the premise (subject/object swapped, or an entity the
  premise does not mention) -> neutral;
* same roles, hypothesis verb of the premise verb's concept (same word or synonym)
  -> entailment, or contradiction when negated;
* same roles, verb of the antonym concept -> contradiction, or entailment when negated
  (the world treats the two concepts as exhaustive);
* same roles, an unrelated verb -> neutral.

Three shortcuts ride on top, each with its own train-time strength (the fraction of
examples carrying the shortcut whose label it predicts):

* ``"overlap"`` -- every hypothesis content word (entities, verb) occurs in the premise;
  predicts entailment. Conflicting examples are HANS-style subject/object swaps
  (neutral) and negated full-overlap hypotheses (contradiction); McCoy et al. 2019,
  "Right for the Wrong Reasons", ACL.
* ``"negation"`` -- a negation word in the hypothesis; predicts contradiction.
  Conflicting examples negate an antonym (entailment) or a neutral hypothesis.
* ``"cue"`` -- a meaningless hypothesis-only word in a fixed slot, tied to one label,
  the annotation artefact of Gururangan et al. 2018 ("Annotation Artifacts in Natural
  Language Inference Data") and Poliak et al. 2018 ("Hypothesis Only Baselines").

Every hypothesis has the same seven-word frame ``{slot} the {subj} {pol} {verb} the {obj}``:
the slot holds a cue word or a filler and the polarity slot a negation or an affirmation
word, so neither shortcut changes length or positions. Premise templates, entities and
decorations are drawn independently of the label and of every shortcut, so no surface
form other than the intended shortcuts predicts the label. A bias type left out of
``biases`` still occurs, at the same rate but uncorrelated with the label, so surface
statistics do not change when a shortcut is switched off.

The shipped world (``resources/synthetic_nli_lexicon.json``) is kept small on purpose, so
that the models of the default study learn the rule rather than only the shortcuts: one
premise template with every word at a fixed position (``the {subj} {verb} the {obj}``; 15
tokens with the hypothesis), sixteen entities and one verb pair (two synonymous verbs per
concept, the two concepts antonyms), with premises drawn from the first concept's verbs only
(the lexicon's optional ``premise_verbs``). With premise verbs of both concepts, the label of
a same-roles pair is a three-way parity (premise concept, hypothesis concept, negation), and
small encoders learn parities only after a long, seed-dependent delay. Measured on this stack
with no shortcut correlated with the label (2-layer d=64 encoder, batch 256, lr 6e-3): with
both premise concepts, 0.62 / 0.89 ID after 300 steps on two seeds (every miss in the
verb-negation cells) and 0.99 in 250 steps on a third; with premises of one concept, 0.99 on
both of those seeds in 300 steps. More verb pairs slow it further (about 1,000 steps with
two, 0.59 after 1,000 with three), and so do templates that move the entities around.
With one premise concept a hypothesis verb's concept is visible on its own, so role-changed
neutrals carry antonym verbs at the rate the other labels do for the same negation state
(``info["neutral_antonym_rate"]``); otherwise antonyms would mark neutrals. Custom lexicons with more
verb pairs and templates work unchanged (a world with one pair simply has no "unrelated
verb" neutrals).

Splits: ``train`` and ``id_test`` follow the biased distribution; ``ood_test`` holds only
examples where at least one active shortcut is present and disagrees with the label
(labels balanced over the labels that admit such an example), weighted so that a
predictor that outputs a shortcut's label scores below chance there.

Groups: ``f"{label}|{bias}:{state},..."`` over the active biases in the order given,
with state ``none`` (absent), ``aligned`` or ``conflicting``; only realisable
combinations are listed (e.g. no ``entailment|overlap:aligned,negation:conflicting``:
full overlap plus negation is never entailment).
"""
from __future__ import annotations

import collections
import functools
import itertools
import json
import math
import os
from dataclasses import dataclass, replace
from typing import Mapping, Optional, Sequence, Union, no_type_check

import numpy as np
import torch
from torch import Tensor

from circuitkd.data.task import Split, Task
from circuitkd.data.tokenizer import WordTokenizer
from circuitkd.errors import CircuitKDError
from circuitkd.types import PromptPairs

LABEL_NAMES = ("entailment", "neutral", "contradiction")
ENTAILMENT, NEUTRAL, CONTRADICTION = 0, 1, 2
KNOWN_BIASES = ("overlap", "negation", "cue")
# The label each structural shortcut predicts when present (a cue word predicts its own label).
SHORTCUT_LABEL = {"overlap": ENTAILMENT, "negation": CONTRADICTION}
MIN_EXAMPLES = 30
# OOD weighting, chosen so that every single-shortcut predictor is below chance on ood_test:
# an active shortcut that agrees with the label is kept rare but not absent (a contradiction
# with conflicting overlap must carry negation, which agrees), and the two conflicting cue
# words share half the weight of one structural conflict so cue conflicts do not swamp the
# split (they would: a cue can conflict with every label, the structural shortcuts cannot).
OOD_ALIGNED_WEIGHT = 0.25
OOD_CUE_CONFLICT_WEIGHT = 0.5
_NO_CUE = -1
_DEFAULT_LEXICON = os.path.join(os.path.dirname(__file__), "resources", "synthetic_nli_lexicon.json")

# (label, overlap present, negation present) combinations the labelling rules allow:
# full overlap without negation is entailment or a swap (neutral); full overlap with
# negation is contradiction or a swap.
_REALISABLE = frozenset({
    (ENTAILMENT, 0, 0), (ENTAILMENT, 1, 0), (ENTAILMENT, 0, 1),
    (CONTRADICTION, 0, 0), (CONTRADICTION, 0, 1), (CONTRADICTION, 1, 1),
    (NEUTRAL, 0, 0), (NEUTRAL, 1, 0), (NEUTRAL, 0, 1), (NEUTRAL, 1, 1),
})


# --------------------------------------------------------------------------------------------
# the world
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Lexicon:
    """The closed world: word lists, verb concepts and templates (see the JSON resource)."""

    nouns: tuple[str, ...]
    concepts: tuple[tuple[str, str], ...]  # concept c and its antonym c ^ 1 sit side by side
    adjectives: tuple[str, ...]
    places: tuple[str, ...]
    prepositions: tuple[str, ...]
    times: tuple[str, ...]
    negations: tuple[str, ...]
    affirmations: tuple[str, ...]
    cue_words: tuple[tuple[str, ...], ...]  # indexed by label
    fillers: tuple[str, ...]
    premise_templates: tuple[str, ...]
    hypothesis_template: str
    # Verbs a premise may use; empty: every verb of every concept.
    premise_verbs: tuple[str, ...] = ()

    @functools.cached_property
    def verb_concept(self) -> dict[str, int]:
        return {w: c for c, words in enumerate(self.concepts) for w in words}

    @functools.cached_property
    def cue_label(self) -> dict[str, int]:
        return {w: label for label, words in enumerate(self.cue_words) for w in words}

    @functools.cached_property
    def noun_set(self) -> frozenset:
        return frozenset(self.nouns)

    def vocabulary(self) -> list[str]:
        """Every word the templates can emit, in a fixed order (the tokenizer's id order)."""
        words: list[str] = ["the"]
        groups = [self.nouns, [w for c in self.concepts for w in c], self.adjectives, self.places,
                  self.prepositions, self.times, self.negations, self.affirmations,
                  [w for ws in self.cue_words for w in ws], self.fillers]
        for group in groups:
            words += [w for w in group if w not in words]
        return words

    @property
    def max_premise_len(self) -> int:
        return max(len(t.split()) for t in self.premise_templates)

    @property
    def hypothesis_len(self) -> int:
        return len(self.hypothesis_template.split())


def load_lexicon(path: Union[str, os.PathLike, None] = None) -> Lexicon:
    """Read the world description (default: the one the package ships)."""
    path = _DEFAULT_LEXICON if path is None else path
    if not os.path.isfile(path):
        raise CircuitKDError(f"lexicon file {str(path)!r} does not exist")
    return _load_lexicon_cached(os.fspath(path))


@functools.lru_cache(maxsize=8)
def _load_lexicon_cached(path: str) -> Lexicon:
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    required = ["nouns", "verb_pairs", "adjectives", "places", "prepositions", "times", "negations",
                "affirmations", "cue_words", "fillers", "premise_templates", "hypothesis_template"]
    missing = [k for k in required if k not in raw]
    if missing:
        raise CircuitKDError(f"lexicon file {path!r} lacks keys {missing}")
    concepts = []
    for pair in raw["verb_pairs"]:
        if len(pair) != 2 or any(len(words) != 2 for words in pair):
            raise CircuitKDError(f"lexicon verb pair {pair!r} must be [[verb, synonym], [antonym, synonym]]")
        concepts += [tuple(pair[0]), tuple(pair[1])]
    missing_cues = [name for name in LABEL_NAMES if name not in raw["cue_words"]]
    if missing_cues:
        raise CircuitKDError(f"lexicon file {path!r} has no cue words for {missing_cues}")
    if len(raw["nouns"]) < 3:
        raise CircuitKDError(f"lexicon file {path!r} needs at least 3 nouns, has {len(raw['nouns'])}")
    verbs = {w for c in concepts for w in c}
    premise_verbs = tuple(raw.get("premise_verbs", ()))
    if "premise_verbs" in raw and not premise_verbs:
        raise CircuitKDError(f"lexicon file {path!r}: premise_verbs is empty (leave it out to allow every verb)")
    unknown = [w for w in premise_verbs if w not in verbs]
    if unknown:
        raise CircuitKDError(f"lexicon file {path!r}: premise_verbs {unknown} are not verbs of any verb pair")
    return Lexicon(
        nouns=tuple(raw["nouns"]), concepts=tuple(concepts), adjectives=tuple(raw["adjectives"]),
        places=tuple(raw["places"]), prepositions=tuple(raw["prepositions"]), times=tuple(raw["times"]),
        negations=tuple(raw["negations"]), affirmations=tuple(raw["affirmations"]),
        cue_words=tuple(tuple(raw["cue_words"][name]) for name in LABEL_NAMES),
        fillers=tuple(raw["fillers"]), premise_templates=tuple(raw["premise_templates"]),
        hypothesis_template=raw["hypothesis_template"], premise_verbs=premise_verbs,
    )


def build_tokenizer(lexicon: Optional[Lexicon] = None) -> WordTokenizer:
    """The word tokenizer over the world's vocabulary."""
    return WordTokenizer((lexicon or load_lexicon()).vocabulary())


# --------------------------------------------------------------------------------------------
# labelling from text (the reference the generator is tested against)
# --------------------------------------------------------------------------------------------
@no_type_check  # per-example hot path: runtime type checks here would dominate generation
def _parse(words: Sequence[str], lex: Lexicon) -> tuple[list[str], Optional[str], bool]:
    nouns = [w for w in words if w in lex.noun_set]
    verbs = [w for w in words if w in lex.verb_concept]
    if len(nouns) != 2 or len(verbs) != 1:
        raise CircuitKDError(f"cannot parse {' '.join(words)!r}: need two entities and one verb")
    return nouns, verbs[0], any(w in lex.negations for w in words)


def nli_label(premise: str, hypothesis: str, lexicon: Optional[Lexicon] = None) -> int:
    """Gold label (0 entailment, 1 neutral, 2 contradiction) of a pair, read off its words."""
    lex = lexicon or load_lexicon()
    (p_subj, p_obj), p_verb, _ = _parse(premise.split(), lex)
    (h_subj, h_obj), h_verb, negated = _parse(hypothesis.split(), lex)
    if (h_subj, h_obj) != (p_subj, p_obj):
        return NEUTRAL
    p_concept, h_concept = lex.verb_concept[p_verb], lex.verb_concept[h_verb]
    if h_concept == p_concept:
        return CONTRADICTION if negated else ENTAILMENT
    if h_concept == p_concept ^ 1:
        return ENTAILMENT if negated else CONTRADICTION
    return NEUTRAL


def shortcut_labels(premise: str, hypothesis: str, lexicon: Optional[Lexicon] = None) -> dict[str, int]:
    """The label each known shortcut predicts for a pair (-1 where the shortcut is absent)."""
    lex = lexicon or load_lexicon()
    p_words, h_words = premise.split(), hypothesis.split()
    content = [w for w in h_words if w in lex.noun_set or w in lex.verb_concept]
    cues = [lex.cue_label[w] for w in h_words if w in lex.cue_label]
    return {
        "overlap": ENTAILMENT if content and all(w in p_words for w in content) else -1,
        "negation": CONTRADICTION if any(w in lex.negations for w in h_words) else -1,
        "cue": cues[0] if cues else -1,
    }


# --------------------------------------------------------------------------------------------
# one example
# --------------------------------------------------------------------------------------------
@no_type_check  # per-example hot path
@dataclass(frozen=True)
class _Example:
    template: int
    subj: str
    obj: str
    verb: str
    adj: str
    time: str
    prep: str
    place: str
    h_subj: str
    h_obj: str
    h_verb: str
    pol: str
    slot: str

    def premise(self, lex: Lexicon) -> str:
        return lex.premise_templates[self.template].format(
            subj=self.subj, obj=self.obj, verb=self.verb, adj=self.adj, time=self.time, prep=self.prep,
            place=self.place)

    def hypothesis(self, lex: Lexicon) -> str:
        return lex.hypothesis_template.format(slot=self.slot, subj=self.h_subj, pol=self.pol, verb=self.h_verb,
                                              obj=self.h_obj)


@no_type_check  # per-example hot path: runtime type checks here would dominate generation
def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


@no_type_check  # per-example hot path: runtime type checks here would dominate generation
def _verb_for(rng: np.random.Generator, lex: Lexicon, premise_verb: str, relation: str) -> str:
    concept = lex.verb_concept[premise_verb]
    if relation == "same":
        return premise_verb
    if relation == "synonym":
        return next(w for w in lex.concepts[concept] if w != premise_verb)
    if relation == "antonym":
        return _pick(rng, lex.concepts[concept ^ 1])
    others = [c for c in range(len(lex.concepts)) if c not in (concept, concept ^ 1)]
    return _pick(rng, lex.concepts[_pick(rng, others)])


@no_type_check  # per-example hot path: runtime type checks here would dominate generation
def _structure(rng: np.random.Generator, label: int, overlap: int, negation: int,
               has_other: bool = True, antonym_rate: Optional[Sequence[float]] = None) -> tuple[str, str]:
    """(roles, verb relation) realising a (label, overlap, negation) cell.

    ``has_other``: the world has a verb concept unrelated to any given one (two verb pairs or
    more); with one pair, neutrals come from role changes only. ``antonym_rate[negation]``:
    the probability that a neutral without full overlap and with changed roles uses an
    antonym verb (see :func:`_neutral_antonym_rate`); ``None`` spreads it evenly.
    """
    if label == NEUTRAL:
        if overlap:
            return "swap", "same"
        # Neutral without full overlap: spread over every way the rules make a neutral, so
        # none becomes a cue of its own; role changes get the larger share because binding
        # entities to roles is the slowest part of the rule for a small encoder to learn.
        other = ("other",) if has_other else ()
        role = _pick(rng, ("swap", "swap", "new", "new", "same") if has_other else ("swap", "new"))
        if role == "same":
            return "same", "other"
        role = "swap" if role == "swap" else _pick(rng, ("new_subj", "new_obj"))
        kept = ("synonym", *other) if role == "swap" else ("same", "synonym", *other)
        if antonym_rate is None:
            return role, _pick(rng, ("antonym", *kept))
        return role, "antonym" if rng.random() < antonym_rate[negation] else _pick(rng, kept)
    if overlap:
        return "same", "same"
    agrees = (label == ENTAILMENT) != bool(negation)
    return "same", "synonym" if agrees else "antonym"


def _neutral_antonym_rate(cells: Mapping[tuple, float], has_other: bool) -> tuple[float, float]:
    """Per negation state, how often a role-changed neutral gets an antonym verb.

    When premises use one verb concept (``premise_verbs``), a hypothesis verb's concept is
    visible without the premise, so the rate at which neutrals carry antonyms must match the
    non-neutrals' (``P(antonym | negation, not neutral)`` under ``cells``); otherwise the
    antonym verbs would become a hypothesis-only cue for one label. Full-overlap neutrals
    (swaps with the premise's verb) and same-role neutrals (an unrelated verb) never carry
    one, so the role-changed rest carries them at a higher rate to make up for it.

    Returns:
        ``(rate without negation, rate with negation)``, each in [0, 1].
    """
    rates = []
    for n in (0, 1):
        mass = {k: sum(p for (label, o, neg, _), p in cells.items() if neg == n and pred(label, o))
                for k, pred in (("antonym", lambda label, o: o == 0 and label == (ENTAILMENT if n else CONTRADICTION)),
                                ("decided", lambda label, o: label != NEUTRAL),
                                ("neutral", lambda label, o: label == NEUTRAL),
                                ("open", lambda label, o: label == NEUTRAL and o == 0))}
        target = mass["antonym"] / mass["decided"] if mass["decided"] > 0 else 0.0
        open_share = mass["open"] * (0.8 if has_other else 1.0)  # one neutral in five keeps its roles
        rates.append(min(1.0, target * mass["neutral"] / open_share) if open_share > 0 else 0.0)
    return rates[0], rates[1]


@no_type_check  # per-example hot path: runtime type checks here would dominate generation
def _sample_example(rng: np.random.Generator, lex: Lexicon, cell: tuple[int, int, int, int],
                    antonym_rate: Optional[Sequence[float]] = None) -> _Example:
    label, overlap, negation, cue = cell
    subj, obj = (lex.nouns[i] for i in rng.choice(len(lex.nouns), size=2, replace=False))
    verb = _pick(rng, lex.premise_verbs) if lex.premise_verbs else _pick(rng, _pick(rng, lex.concepts))
    role, relation = _structure(rng, label, overlap, negation, has_other=len(lex.concepts) > 2,
                                antonym_rate=antonym_rate)
    h_subj, h_obj = (obj, subj) if role == "swap" else (subj, obj)
    if role in ("new_subj", "new_obj"):
        new = _pick(rng, [w for w in lex.nouns if w not in (subj, obj)])
        h_subj, h_obj = (new, obj) if role == "new_subj" else (subj, new)
    return _Example(
        template=int(rng.integers(len(lex.premise_templates))), subj=subj, obj=obj, verb=verb,
        adj=_pick(rng, lex.adjectives), time=_pick(rng, lex.times), prep=_pick(rng, lex.prepositions),
        place=_pick(rng, lex.places), h_subj=h_subj, h_obj=h_obj, h_verb=_verb_for(rng, lex, verb, relation),
        pol=_pick(rng, lex.negations if negation else lex.affirmations),
        slot=_pick(rng, lex.cue_words[cue] if cue != _NO_CUE else lex.fillers),
    )


# --------------------------------------------------------------------------------------------
# distributions over cells (label, overlap, negation, cue label or -1)
# --------------------------------------------------------------------------------------------
def _train_cells(strength: Mapping[str, float], presence: Mapping[str, float]) -> dict[tuple, float]:
    """Probability of each cell under the biased (train / id_test) distribution.

    A shortcut with strength s and presence rate r appears in a 3rs fraction of the examples
    with its label and a 3r(1-s)/2 fraction of each other label: labels stay balanced, the
    shortcut is present in a fraction r of the data and P(label it predicts | present) = s.
    """
    def rates(bias: str, label: int) -> float:
        s, r = strength[bias], presence[bias]
        return 3 * r * s if label == SHORTCUT_LABEL[bias] else 3 * r * (1 - s) / 2

    cells: dict[tuple, float] = {}
    for label in range(3):
        p_o, p_n = rates("overlap", label), rates("negation", label)
        joint = {(o, n): (p_o if o else 1 - p_o) * (p_n if n else 1 - p_n) for o in (0, 1) for n in (0, 1)}
        # One (overlap, negation) combination per label is unrealisable; moving its mass
        # around the 2x2 square keeps both marginals (so presence and strength) intact. The
        # move may take at most half of the opposite cell, so no realisable structure vanishes
        # (with both shortcuts uncorrelated it would empty "contradiction by negated synonym");
        # any rest is dropped, i.e. rejected, and Task.info reports the resulting rates.
        bad = next(((o, n) for (o, n) in joint if (label, o, n) not in _REALISABLE), None)
        if bad is not None:
            o, n = bad
            opposite = (1 - o, 1 - n)
            moved = min(joint[bad], joint[opposite] / 2)
            joint[(o, 1 - n)] += moved
            joint[(1 - o, n)] += moved
            joint[opposite] -= moved
            joint[bad] = 0.0
            total = sum(joint.values())
            joint = {k: v / total for k, v in joint.items()}
        r_c, s_c = presence["cue"], strength["cue"]
        cue_probs = {_NO_CUE: 1 - r_c}
        cue_probs.update({k: r_c * s_c if k == label else r_c * (1 - s_c) / 2 for k in range(3)})
        for (o, n), p in joint.items():
            for cue, pc in cue_probs.items():
                if p * pc > 0:
                    cells[(label, o, n, cue)] = p * pc / 3
    return cells


@no_type_check  # per-example hot path: runtime type checks here would dominate generation
def _states(cell: tuple, biases: Sequence[str]) -> dict[str, str]:
    label, overlap, negation, cue = cell
    predicted = {"overlap": ENTAILMENT if overlap else -1, "negation": CONTRADICTION if negation else -1, "cue": cue}
    return {b: "none" if predicted[b] < 0 else ("aligned" if predicted[b] == label else "conflicting")
            for b in biases}


def _ood_cells(biases: Sequence[str], presence: Mapping[str, float]) -> dict[tuple, float]:
    """Cells of the bias-conflicting split: some active shortcut disagrees with every label."""
    cells: dict[tuple, float] = {}
    weight_by_label = []
    for label in range(3):
        weights = {}
        for o, n, cue in itertools.product((0, 1), (0, 1), (_NO_CUE, 0, 1, 2)):
            if (label, o, n) not in _REALISABLE:
                continue
            cell = (label, o, n, cue)
            states = _states(cell, KNOWN_BIASES)
            if not any(states[b] == "conflicting" for b in biases):
                continue
            w = 1.0
            for b, state in states.items():
                n_cells = 2 if (b == "cue" and state == "conflicting") else 1
                if b in biases:
                    w *= {"none": 1.0, "aligned": OOD_ALIGNED_WEIGHT,
                          "conflicting": OOD_CUE_CONFLICT_WEIGHT if b == "cue" else 1.0}[state] / n_cells
                else:  # inactive: present at its usual rate, uncorrelated with the label
                    n_cells = 3 if (b == "cue" and state != "none") else 1
                    w *= (1 - presence[b]) if state == "none" else presence[b] / n_cells
            weights[cell] = w
        weight_by_label.append(weights)
    labels_present = [ws for ws in weight_by_label if sum(ws.values()) > 0]
    for weights in labels_present:
        total = sum(weights.values())
        cells.update({c: w / total / len(labels_present) for c, w in weights.items()})
    return cells


def _quota(cells: Mapping[tuple, float], n: int) -> list[tuple]:
    """``n`` cells in proportion to ``cells`` (largest remainder), so split rates are exact.

    Labels are apportioned first and cells within each label second, so label counts differ
    by at most one however many cells a label has.
    """
    by_label: dict[int, dict[tuple, float]] = collections.defaultdict(dict)
    for cell, p in cells.items():
        by_label[cell[0]][cell] = p
    labels = sorted(by_label)
    per_label = _largest_remainder([sum(by_label[k].values()) for k in labels], n)
    out: list[tuple] = []
    for label, n_label in zip(labels, per_label):
        keys = sorted(by_label[label])
        counts = _largest_remainder([by_label[label][k] for k in keys], n_label)
        out += [k for k, c in zip(keys, counts) for _ in range(c)]
    return out


def _largest_remainder(weights: Sequence[float], n: int) -> list[int]:
    raw = np.asarray(weights, dtype=float)
    raw = raw / raw.sum() * n
    counts = np.floor(raw + 1e-9).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: n - int(counts.sum())]:
        counts[i] += 1
    return counts.tolist()


# --------------------------------------------------------------------------------------------
# encoding
# --------------------------------------------------------------------------------------------
def _token_classes(examples: Sequence[_Example], lex: Lexicon, seq_len: int) -> dict[str, Tensor]:
    names = ("premise", "hypothesis", "overlap", "negation", "cue", "cls", "sep", "entity", "verb")
    # numpy first: element-wise writes into torch tensors cost microseconds each
    out = {k: np.zeros((len(examples), seq_len), dtype=bool) for k in names}
    for i, ex in enumerate(examples):
        p_words, h_words = ex.premise(lex).split(), ex.hypothesis(lex).split()
        h_start = len(p_words) + 2
        out["cls"][i, 0] = True
        out["sep"][i, [len(p_words) + 1, h_start + len(h_words)]] = True
        out["premise"][i, 1: 1 + len(p_words)] = True
        out["hypothesis"][i, h_start: h_start + len(h_words)] = True
        shared = {w for w in h_words if (w in lex.noun_set or w in lex.verb_concept) and w in p_words}
        for pos, w in enumerate(p_words + ["[SEP]"] + h_words, start=1):
            if w in shared:
                out["overlap"][i, pos] = True
            if w in lex.noun_set:
                out["entity"][i, pos] = True
            elif w in lex.verb_concept:
                out["verb"][i, pos] = True
            elif pos >= h_start and w in lex.cue_label:
                out["cue"][i, pos] = True
            elif pos >= h_start and w in lex.negations:
                out["negation"][i, pos] = True
    return {k: torch.from_numpy(v) for k, v in out.items()}


def _encode(examples: Sequence[_Example], lex: Lexicon, tokenizer: WordTokenizer, seq_len: int
            ) -> tuple[Tensor, Tensor]:
    return tokenizer.batch_encode([(ex.premise(lex), ex.hypothesis(lex)) for ex in examples], max_len=seq_len)


# --------------------------------------------------------------------------------------------
# the generator
# --------------------------------------------------------------------------------------------
class _Generator:
    """Everything a task needs to draw more examples after it is built (pairs, augmentation)."""

    def __init__(self, seed: int, biases: tuple[str, ...], strength: dict[str, float],
                 presence: dict[str, float], lex: Lexicon, tokenizer: WordTokenizer) -> None:
        self.seed, self.biases, self.strength, self.presence = seed, biases, strength, presence
        self.lex, self.tokenizer = lex, tokenizer
        self.seq_len = 1 + lex.max_premise_len + 1 + lex.hypothesis_len + 1
        self.group_names = self._group_names()
        self._group_index = {g: i for i, g in enumerate(self.group_names)}
        self.eval_texts: set[tuple[str, str]] = set()
        # Set from the training distribution once it is known; None keeps the even spread.
        self.antonym_rate: Optional[tuple[float, float]] = None

    def _group_names(self) -> tuple[str, ...]:
        names = []
        for label in range(3):
            options = []
            for b in self.biases:
                agree = "aligned" if SHORTCUT_LABEL.get(b) == label else "conflicting"
                options.append(("none", "aligned", "conflicting") if b == "cue" else ("none", agree))
            for combo in itertools.product(*options):
                states = dict(zip(self.biases, combo))
                if not self._realisable(label, states):
                    continue
                names.append(self._group_name(label, states))
        return tuple(names)

    def _realisable(self, label: int, states: dict[str, str]) -> bool:
        o_opts = (0, 1) if "overlap" not in states else ((0,) if states["overlap"] == "none" else (1,))
        n_opts = (0, 1) if "negation" not in states else ((0,) if states["negation"] == "none" else (1,))
        return any((label, o, n) in _REALISABLE for o in o_opts for n in n_opts)

    @no_type_check  # once per example
    def _group_name(self, label: int, states: Mapping[str, str]) -> str:
        return f"{LABEL_NAMES[label]}|" + ",".join(f"{b}:{states[b]}" for b in self.biases)

    def rng(self, *stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *stream])

    def draw(self, cells: Sequence[tuple], rng: np.random.Generator, avoid: set) -> list[tuple[tuple, _Example]]:
        """One example per cell, in a shuffled order, none whose text is in ``avoid``."""
        order = rng.permutation(len(cells))
        examples = []
        for i in order:
            for _ in range(1000):
                ex = _sample_example(rng, self.lex, cells[i], self.antonym_rate)
                key = (ex.premise(self.lex), ex.hypothesis(self.lex))
                if key not in avoid:
                    break
            else:
                raise CircuitKDError(f"could not draw a new example for cell {cells[i]}: the world is exhausted")
            avoid.add(key)
            examples.append((cells[i], ex))
        return examples

    def to_split(self, drawn: Sequence[tuple[tuple, _Example]]) -> Split:
        cells = [c for c, _ in drawn]
        examples = [ex for _, ex in drawn]
        input_ids, attention_mask = _encode(examples, self.lex, self.tokenizer, self.seq_len)
        labels = torch.tensor([c[0] for c in cells], dtype=torch.long)
        predicted = {"overlap": [ENTAILMENT if c[1] else -1 for c in cells],
                     "negation": [CONTRADICTION if c[2] else -1 for c in cells],
                     "cue": [c[3] for c in cells]}
        groups = torch.tensor([self._group_index[self._group_name(c[0], _states(c, self.biases))] for c in cells],
                              dtype=torch.long)
        return Split(
            inputs=input_ids, labels=labels,
            bias_labels={b: torch.tensor(predicted[b], dtype=torch.long) for b in self.biases},
            groups=groups, attention_mask=attention_mask,
            token_classes=_token_classes(examples, self.lex, self.seq_len),
        )

    # --- augmentation -----------------------------------------------------------------------
    def augment(self, n: int, seed: int = 0) -> Split:
        """``n`` bias-conflicting examples (the ood_test distribution), none repeating a test example.

        Returns a :class:`Split` padded to the task's ``seq_len`` like ``train``.
        """
        _check_count("n", n, minimum=1)
        rng = np.random.default_rng([self.seed, 7, int(seed)])
        cells = _quota(_ood_cells(self.biases, self.presence), n)
        return self.to_split(self.draw(cells, rng, set(self.eval_texts)))

    # --- counterfactual pairs ---------------------------------------------------------------
    def pairs(self, n: int, flip: str = "shortcut", bias: Optional[str] = None, seed: int = 0) -> PromptPairs:
        """``n`` clean/corrupt pairs of one length; see :meth:`Task.counterfactual_pairs`.

        Returns a :class:`PromptPairs` with ``clean``/``corrupt`` ``Int[batch pos]`` (pos = seq_len),
        the shared ``attention_mask``, ``position=0`` and gold ``clean_answer``/``corrupt_answer``;
        ``meta`` holds ``bias`` (list of str), ``clean_bias_label`` and ``corrupt_bias_label``
        (``Int[batch]``, the label the chosen shortcut predicts on each side, -1 where absent).
        """
        _check_count("n", n, minimum=1)
        if flip not in ("shortcut", "label"):
            raise CircuitKDError(f"flip must be 'shortcut' or 'label', got {flip!r}")
        if bias is not None and bias not in self.biases:
            raise CircuitKDError(f"unknown bias type {bias!r}; this task has {self.biases}")
        rng = np.random.default_rng([self.seed, 11, int(seed), 0 if flip == "shortcut" else 1])
        clean, corrupt, answers, bias_names, bias_labels = [], [], [], [], []
        for _ in range(n):
            b = bias if bias is not None else _pick(rng, self.biases)
            a, c, cell_a, cell_c = self._pair(rng, b, flip)
            if rng.random() < 0.5:  # both directions, so "clean" is not always the shortcut-present side
                a, c, cell_a, cell_c = c, a, cell_c, cell_a
            clean.append(a)
            corrupt.append(c)
            answers.append((cell_a[0], cell_c[0]))
            bias_names.append(b)
            bias_labels.append((_predicted(cell_a, b), _predicted(cell_c, b)))
        clean_ids, mask = _encode(clean, self.lex, self.tokenizer, self.seq_len)
        corrupt_ids, corrupt_mask = _encode(corrupt, self.lex, self.tokenizer, self.seq_len)
        if not torch.equal(mask, corrupt_mask):  # the edits are in-place by construction
            raise CircuitKDError("internal error: a counterfactual edit changed the sequence length")
        return PromptPairs(
            clean=clean_ids, corrupt=corrupt_ids, attention_mask=mask, position=0,
            clean_answer=torch.tensor([a for a, _ in answers], dtype=torch.long),
            corrupt_answer=torch.tensor([c for _, c in answers], dtype=torch.long),
            meta={"bias": bias_names, "flip": flip,
                  "clean_bias_label": torch.tensor([a for a, _ in bias_labels], dtype=torch.long),
                  "corrupt_bias_label": torch.tensor([c for _, c in bias_labels], dtype=torch.long)},
        )

    def _pair(self, rng: np.random.Generator, bias: str, flip: str) -> tuple[_Example, _Example, tuple, tuple]:
        """One base example and its minimal edit, with the cells (label, overlap, negation, cue) of each."""
        lex = self.lex
        cue = _pick(rng, (_NO_CUE, 0, 1, 2))
        if bias == "cue":
            cue = int(rng.integers(3))
        if flip == "shortcut":
            if bias == "overlap":
                # exact verb <-> its synonym: overlap appears/disappears, meaning unchanged
                label = int(rng.integers(3))
                negation = int(rng.integers(2)) if label == NEUTRAL else int(label == CONTRADICTION)
                cell = (label, 1, negation, cue)
                base = _sample_example(rng, lex, cell, self.antonym_rate)
                edit = replace(base, h_verb=_verb_for(rng, lex, base.verb, "synonym"))
                return base, edit, cell, (label, 0, negation, cue)
            if bias == "negation":
                label = int(rng.integers(3))
                if label == NEUTRAL:  # negating a neutral hypothesis leaves it neutral
                    cell = (NEUTRAL, int(rng.integers(2)), 0, cue)
                    base = _sample_example(rng, lex, cell, self.antonym_rate)
                    edit = replace(base, pol=_pick(rng, lex.negations))
                    return base, edit, cell, (NEUTRAL, cell[1], 1, cue)
                # verb -> antonym plus negation: "helped" and "never ignored" mean the same
                cell = (label, 0, 0, cue)
                base = _sample_example(rng, lex, cell, self.antonym_rate)
                edit = replace(base, pol=_pick(rng, lex.negations),
                               h_verb=_verb_for(rng, lex, base.verb, "antonym" if base.h_verb in
                                                lex.concepts[lex.verb_concept[base.verb]] else "synonym"))
                return base, edit, cell, (label, 0, 1, cue)
            # cue: swap the cue word for one tied to a different label
            label, o, n = _pick(rng, sorted(_REALISABLE))
            cell = (label, o, n, cue)
            base = _sample_example(rng, lex, cell, self.antonym_rate)
            other = _pick(rng, [k for k in range(3) if k != cue])
            return base, replace(base, slot=_pick(rng, lex.cue_words[other])), cell, (label, o, n, other)
        # flip == "label": the shortcut's word(s) stay, the structure changes the gold label
        if bias == "overlap":
            negation = int(rng.integers(2))
            label = CONTRADICTION if negation else ENTAILMENT
            cell = (label, 1, negation, cue)
            base = _sample_example(rng, lex, cell, self.antonym_rate)
            return base, replace(base, h_subj=base.h_obj, h_obj=base.h_subj), cell, (NEUTRAL, 1, negation, cue)
        negation = 1 if bias == "negation" else int(rng.integers(2))
        label = CONTRADICTION if negation else ENTAILMENT  # same roles, synonym verb
        cell = (label, 0, negation, cue)
        base = _sample_example(rng, lex, cell, self.antonym_rate)
        relation = _pick(rng, ("antonym", "other") if len(lex.concepts) > 2 else ("antonym",))
        target = NEUTRAL if relation == "other" else (ENTAILMENT if negation else CONTRADICTION)
        return base, replace(base, h_verb=_verb_for(rng, lex, base.verb, relation)), cell, (target, 0, negation, cue)


@no_type_check  # per-example hot path: runtime type checks here would dominate generation
def _predicted(cell: tuple, bias: str) -> int:
    label, overlap, negation, cue = cell
    return {"overlap": ENTAILMENT if overlap else -1, "negation": CONTRADICTION if negation else -1,
            "cue": cue}[bias]


# --------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------
def _check_count(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise CircuitKDError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise CircuitKDError(f"{name}={value} is too small: need at least {minimum}")


def _per_bias(name: str, value, default: float, lo: float, hi: float, lo_open: bool = False) -> dict[str, float]:
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(KNOWN_BIASES))
        if unknown:
            raise CircuitKDError(f"{name} names unknown bias types {unknown}; known: {KNOWN_BIASES}")
        out = {b: value.get(b, default) for b in KNOWN_BIASES}
    else:
        out = {b: value for b in KNOWN_BIASES}
    for b, v in out.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
            raise CircuitKDError(f"{name}[{b!r}] must be a number, got {v!r}")
        if v > hi or v < lo or (lo_open and v <= lo):
            raise CircuitKDError(f"{name}[{b!r}]={v} is outside {'(' if lo_open else '['}{lo}, {hi}]")
        out[b] = float(v)
    return out


# --------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------
def synthetic_nli(
    seed: int = 0,
    n_train: int = 6000,
    n_id: int = 1000,
    n_ood: int = 1000,
    biases: Sequence[str] = ("overlap", "negation", "cue"),
    strength: Union[float, Mapping[str, float]] = 0.9,
    presence: Union[float, Mapping[str, float]] = 1 / 3,
) -> Task:
    """Build the synthetic NLI task (see the module docstring for the world and the splits).

    Args:
        seed: makes every split, pair and augmentation set deterministic.
        n_train, n_id, n_ood: examples in ``train``, ``id_test`` and ``ood_test`` (each >= 30).
        biases: active shortcut types, a subset of ``("overlap", "negation", "cue")``. Inactive
            ones still occur, uncorrelated with the label, and are not annotated.
        strength: P(gold label = the shortcut's label | shortcut present) in train and id_test,
            one number or a dict per bias (missing entries default to 0.9). 1/3 is no bias.
        presence: fraction of examples carrying each shortcut (default 1/3). A structural
            shortcut needs ``presence * strength <= 1/3`` so that labels stay balanced.

    Returns:
        a :class:`Task` whose splits hold ``inputs``/``attention_mask`` ``Int[n pos]`` (pos = 19,
        right-padded), ``labels`` ``Int[n]``, ``bias_labels[b]`` ``Int[n]`` and ``token_classes``
        ``Bool[n pos]`` for premise, hypothesis, overlap, negation, cue, cls, sep, entity, verb.
        ``Task.pair_fn`` draws counterfactual pairs and ``Task.augment_fn`` bias-conflicting
        augmentation data from the same world.
    """
    _check_count("seed", seed, minimum=0)
    for name, value in (("n_train", n_train), ("n_id", n_id), ("n_ood", n_ood)):
        _check_count(name, value, minimum=MIN_EXAMPLES)
    if isinstance(biases, str):
        biases = (biases,)
    biases = tuple(biases)
    unknown = [b for b in biases if b not in KNOWN_BIASES]
    if unknown:
        raise CircuitKDError(f"unknown bias type(s) {unknown}; known bias types are {KNOWN_BIASES}")
    if not biases:
        raise CircuitKDError(f"biases is empty: name at least one of {KNOWN_BIASES} (strength=1/3 gives no bias)")
    if len(set(biases)) != len(biases):
        raise CircuitKDError(f"biases {biases} repeats a bias type")
    strength_by_bias = _per_bias("strength", strength, 0.9, 0.0, 1.0)
    presence_by_bias = _per_bias("presence", presence, 1 / 3, 0.0, 1.0, lo_open=True)
    effective = {b: strength_by_bias[b] if b in biases else 1 / 3 for b in KNOWN_BIASES}
    for b in ("overlap", "negation"):
        r, s = presence_by_bias[b], effective[b]
        if 3 * r * s > 1 + 1e-9 or 3 * r * (1 - s) / 2 > 1 + 1e-9:
            raise CircuitKDError(
                f"presence[{b!r}]={r:.3g} with strength {s:.3g} cannot keep labels balanced: "
                f"need presence*strength <= 1/3 and presence*(1-strength) <= 2/3"
            )

    lex = load_lexicon()
    tokenizer = build_tokenizer(lex)
    gen = _Generator(int(seed), biases, effective, presence_by_bias, lex, tokenizer)
    train_cells = _train_cells(effective, presence_by_bias)
    ood_cells = _ood_cells(biases, presence_by_bias)
    if lex.premise_verbs:
        gen.antonym_rate = _neutral_antonym_rate(train_cells, has_other=len(lex.concepts) > 2)
    seen: set = set()
    # Test splits are drawn first and every later draw avoids their texts, so no test
    # example also appears in train or in augmentation data.
    ood = gen.draw(_quota(ood_cells, n_ood), gen.rng(3), seen)
    id_test = gen.draw(_quota(train_cells, n_id), gen.rng(2), seen)
    gen.eval_texts = set(seen)
    train = gen.draw(_quota(train_cells, n_train), gen.rng(1), seen)

    expected_aligned = {}
    for b in biases:
        present = {c: p for c, p in train_cells.items() if _predicted(c, b) >= 0}
        total = sum(present.values())
        expected_aligned[b] = sum(p for c, p in present.items() if _predicted(c, b) == c[0]) / total
    info = {
        "generator": "synthetic_nli", "seed": int(seed), "n_train": int(n_train), "n_id": int(n_id),
        "n_ood": int(n_ood), "biases": list(biases),
        "strength": {b: strength_by_bias[b] for b in biases},
        "presence": presence_by_bias, "seq_len": gen.seq_len,
        "inactive_biases": [b for b in KNOWN_BIASES if b not in biases],
        "expected_train_aligned_rate": expected_aligned,
        "ood_aligned_weight": OOD_ALIGNED_WEIGHT, "ood_cue_conflict_weight": OOD_CUE_CONFLICT_WEIGHT,
        "lexicon": os.path.basename(_DEFAULT_LEXICON), "label_names": list(LABEL_NAMES),
        "neutral_antonym_rate": None if gen.antonym_rate is None else list(gen.antonym_rate),
    }
    return Task(
        name="synthetic_nli", modality="text", n_classes=3, label_names=LABEL_NAMES, bias_types=biases,
        group_names=gen.group_names,
        splits={"train": gen.to_split(train), "id_test": gen.to_split(id_test), "ood_test": gen.to_split(ood)},
        tokenizer=tokenizer, info=info, pair_fn=gen.pairs, augment_fn=gen.augment,
    )
