import collections
import json

import pytest
import torch

from circuitkd.data.synthetic_nli import (
    CONTRADICTION, ENTAILMENT, KNOWN_BIASES, NEUTRAL, load_lexicon, nli_label, shortcut_labels, synthetic_nli,
)
from circuitkd.errors import CircuitKDError

torch.set_num_threads(1)
LEX = load_lexicon()


@pytest.fixture(scope="module")
def task():
    return synthetic_nli(seed=0)


def texts(tokenizer, ids):
    """(premise, hypothesis) strings of one encoded row."""
    words = tokenizer.decode(ids).split()
    first, last = words.index("[SEP]"), len(words) - 1
    return " ".join(words[1:first]), " ".join(words[first + 1:last])


def test_shapes_and_padding(task):
    assert task.seq_len <= 32
    assert {s: len(task.split(s)) for s in ("train", "id_test", "ood_test")} == \
        {"train": 6000, "id_test": 1000, "ood_test": 1000}
    for split in task.splits.values():
        assert split.inputs.shape == split.attention_mask.shape == (len(split), task.seq_len)
        assert split.inputs.dtype == torch.long
        assert (split.inputs[split.attention_mask == 0] == task.pad_id).all()
        # right padding: the mask is a prefix of ones
        assert (split.attention_mask[:, 1:] <= split.attention_mask[:, :-1]).all()
    assert task.label_names == ("entailment", "neutral", "contradiction")
    json.dumps(task.info)


def test_deterministic_given_seed(task):
    again = synthetic_nli(seed=0)
    other = synthetic_nli(seed=1)
    for name in task.splits:
        assert torch.equal(task.split(name).inputs, again.split(name).inputs)
        assert torch.equal(task.split(name).groups, again.split(name).groups)
    assert not torch.equal(task.train.inputs, other.train.inputs)


def test_labels_and_bias_labels_match_text(task):
    tok = task.tokenizer
    for split in task.splits.values():
        for i in range(len(split)):
            premise, hypothesis = texts(tok, split.inputs[i])
            assert nli_label(premise, hypothesis) == split.labels[i]
            derived = shortcut_labels(premise, hypothesis)
            for b in task.bias_types:
                assert derived[b] == split.bias_labels[b][i], (premise, hypothesis, b)


def _two_pair_lexicon():
    import json
    import os
    import tempfile

    from circuitkd.data.synthetic_nli import _DEFAULT_LEXICON, load_lexicon

    raw = json.loads(open(_DEFAULT_LEXICON).read())
    raw["verb_pairs"] = raw["verb_pairs"] + [[["praised", "applauded"], ["insulted", "mocked"]]]
    path = os.path.join(tempfile.mkdtemp(), "lexicon.json")
    with open(path, "w") as f:
        json.dump(raw, f)
    return load_lexicon(path)


def test_reference_labeller_on_hand_written_pairs():
    p = "the doctor helped the judge"
    assert nli_label(p, "then the doctor also helped the judge") == ENTAILMENT
    assert nli_label(p, "then the doctor also assisted the judge") == ENTAILMENT
    assert nli_label(p, "then the doctor never ignored the judge") == ENTAILMENT
    assert nli_label(p, "then the doctor never helped the judge") == CONTRADICTION
    assert nli_label(p, "then the doctor also neglected the judge") == CONTRADICTION
    assert nli_label(p, "then the judge also helped the doctor") == NEUTRAL
    # an unrelated verb needs a world with a second verb pair (the shipped one has one)
    assert nli_label(p, "then the doctor also praised the judge", _two_pair_lexicon()) == NEUTRAL
    assert nli_label(p, "then the pilot also helped the judge") == NEUTRAL
    assert shortcut_labels(p, "perhaps the judge never helped the doctor") == \
        {"overlap": ENTAILMENT, "negation": CONTRADICTION, "cue": NEUTRAL}


def test_train_labels_balanced_and_shortcuts_at_strength(task):
    train = task.train
    assert torch.bincount(train.labels, minlength=3).tolist() == [2000, 2000, 2000]
    for b in KNOWN_BIASES:
        present = train.has_bias(b)
        assert abs(present.float().mean() - 1 / 3) < 0.01
        assert abs((train.bias_labels[b][present] == train.labels[present]).float().mean() - 0.9) < 0.01


def test_strength_per_bias_and_extremes():
    strength = {"overlap": 0.7, "negation": 0.95, "cue": 0.5}
    train = synthetic_nli(seed=2, n_train=3000, n_id=30, n_ood=30, strength=strength).train
    for b, s in strength.items():
        present = train.has_bias(b)
        assert abs((train.bias_labels[b][present] == train.labels[present]).float().mean() - s) < 0.02
    pure = synthetic_nli(seed=0, n_train=600, n_id=30, n_ood=30, strength=1.0).train
    assert pure.aligned().all() and not pure.conflicting().any()


def test_ood_is_conflicting_balanced_and_defeats_bias_only_predictors(task):
    ood = task.ood_test
    assert ood.conflicting().all()
    counts = torch.bincount(ood.labels, minlength=3)
    assert counts.max() - counts.min() <= 2
    for b in task.bias_types:
        present = ood.has_bias(b)
        assert present.float().mean() > 0.3  # every shortcut is represented
        assert ood.conflicting(b).float().mean() > 0.25
        # predict the shortcut's label where present, guess at chance where absent
        acc = ((ood.bias_labels[b] == ood.labels) & present).float().sum() + (~present).float().sum() / 3
        assert acc / len(ood) <= 1 / 3 + 0.01, b
    n_present = sum(ood.has_bias(b).float() for b in task.bias_types)
    votes = sum(((ood.bias_labels[b] == ood.labels) & ood.has_bias(b)).float() for b in task.bias_types)
    vote_acc = torch.where(n_present > 0, votes / n_present.clamp(min=1), torch.full_like(votes, 1 / 3)).mean()
    assert vote_acc < 1 / 3


def test_single_bias_task_annotates_only_that_bias():
    task = synthetic_nli(seed=0, n_train=1500, n_id=60, n_ood=300, biases=("negation",))
    assert task.bias_types == ("negation",) and set(task.train.bias_labels) == {"negation"}
    assert task.ood_test.conflicting("negation").all()
    # negation always predicts contradiction, so the conflicting split holds the other two labels
    assert torch.bincount(task.ood_test.labels, minlength=3).tolist() == [150, 150, 0]
    # switched-off shortcuts still occur, uncorrelated with the label
    tok, train = task.tokenizer, task.train
    overlap_labels = [int(train.labels[i]) for i in range(len(train))
                      if shortcut_labels(*texts(tok, train.inputs[i]))["overlap"] >= 0]
    assert abs(len(overlap_labels) / len(train) - 1 / 3) < 0.02
    assert abs(overlap_labels.count(ENTAILMENT) / len(overlap_labels) - 1 / 3) < 0.05


def test_no_template_or_word_predicts_the_label(task):
    tok, train = task.tokenizer, task.train
    by_template = collections.defaultdict(list)
    by_word = collections.defaultdict(list)
    by_group_template = collections.Counter()
    shortcut_words = set(LEX.negations) | set(LEX.cue_label) | set(LEX.affirmations)
    templates = [t.split() for t in LEX.premise_templates]
    for i in range(len(train)):
        premise, hypothesis = texts(tok, train.inputs[i])
        label = int(train.labels[i])
        template = next(k for k, t in enumerate(templates)
                        if len(t) == len(premise.split())
                        and all(a == b or a.startswith("{") for a, b in zip(t, premise.split())))
        by_template[template].append(label)
        by_group_template[(int(train.groups[i]), template)] += 1
        for side, sentence in (("premise", premise), ("hypothesis", hypothesis)):
            for w in set(sentence.split()) - shortcut_words - {"the"}:
                by_word[(side, w)].append(label)
    assert len(by_template) == len(LEX.premise_templates)
    for template, labels in by_template.items():
        assert max(collections.Counter(labels).values()) / len(labels) < 0.4, template
    for word, labels in by_word.items():
        if len(labels) >= 50:
            assert max(collections.Counter(labels).values()) / len(labels) < 0.45, word
    # templates are spread over the label x shortcut groups as over the whole split
    group_sizes = torch.bincount(train.groups, minlength=len(task.group_names))
    for g in torch.nonzero(group_sizes >= 200).flatten().tolist():
        shares = [by_group_template[(g, t)] / int(group_sizes[g]) for t in range(len(templates))]
        assert max(abs(s - 1 / len(templates)) for s in shares) < 0.07, task.group_names[g]
    # sequence length says nothing about the label either
    lengths = train.attention_mask.sum(1)
    for length in lengths.unique():
        counts = torch.bincount(train.labels[lengths == length], minlength=3).float()
        assert counts.max() / counts.sum() < 0.4


def test_groups_name_label_and_shortcut_states(task):
    for split in task.splits.values():
        for i in range(0, len(split), 7):
            name = task.group_names[int(split.groups[i])]
            label_name, states = name.split("|")
            label = int(split.labels[i])
            assert label_name == task.label_names[label]
            for part in states.split(","):
                b, state = part.split(":")
                predicted = int(split.bias_labels[b][i])
                expected = "none" if predicted < 0 else ("aligned" if predicted == label else "conflicting")
                assert state == expected, name
    assert "entailment|overlap:aligned,negation:conflicting,cue:none" not in task.group_names
    assert len(set(task.group_names)) == len(task.group_names)


def test_token_classes(task):
    split, tok = task.train, task.tokenizer
    tc = split.token_classes
    assert {"premise", "hypothesis", "overlap", "negation", "cue", "cls", "sep"} <= set(tc)
    assert tc["cls"][:, 0].all() and tc["cls"].sum() == len(split)
    assert (tc["sep"].sum(1) == 2).all()
    assert (split.inputs[tc["sep"]] == tok.sep_token_id).all()
    assert not (tc["premise"] & tc["hypothesis"]).any()
    assert torch.equal(tc["premise"] | tc["hypothesis"] | tc["cls"] | tc["sep"], split.attention_mask.bool())
    assert torch.equal(tc["negation"].any(1), split.has_bias("negation"))
    assert torch.equal(tc["cue"].any(1), split.has_bias("cue"))
    assert not (tc["negation"] & tc["premise"]).any() and not (tc["cue"] & tc["premise"]).any()
    negation_ids = torch.tensor(tok.convert_tokens_to_ids(list(LEX.negations)))
    assert torch.isin(split.inputs[tc["negation"]], negation_ids).all()
    # full overlap <=> all three hypothesis content words marked
    content = tc["hypothesis"] & (tc["entity"] | tc["verb"])
    full = ((tc["overlap"] & content).sum(1) == 3)
    assert torch.equal(full, split.has_bias("overlap"))
    # overlap marks hypothesis words and the premise words they match
    for i in range(50):
        hyp = set(split.inputs[i][tc["overlap"][i] & tc["hypothesis"][i]].tolist())
        prem = set(split.inputs[i][tc["overlap"][i] & tc["premise"][i]].tolist())
        assert hyp == prem


@pytest.mark.parametrize("flip", ["shortcut", "label"])
@pytest.mark.parametrize("bias", ["overlap", "negation", "cue", None])
def test_counterfactual_pairs(task, flip, bias):
    pairs = task.counterfactual_pairs(n=60, flip=flip, bias=bias, seed=3)
    tok = task.tokenizer
    assert pairs.clean.shape == pairs.corrupt.shape == (60, task.seq_len) and pairs.position == 0
    assert torch.equal(pairs.attention_mask, (pairs.clean != tok.pad_token_id).long())
    assert torch.equal(pairs.attention_mask, (pairs.corrupt != tok.pad_token_id).long())
    n_edits = (pairs.clean != pairs.corrupt).sum(1)
    assert ((n_edits >= 1) & (n_edits <= 2)).all()
    meta = pairs.meta
    assert len(meta["bias"]) == 60 and set(meta["bias"]) <= set(task.bias_types)
    if bias is None:
        assert len(set(meta["bias"])) == len(task.bias_types)
    for i in range(60):
        b = meta["bias"][i]
        clean_text, corrupt_text = texts(tok, pairs.clean[i]), texts(tok, pairs.corrupt[i])
        assert clean_text[0] == corrupt_text[0]  # the edit is in the hypothesis
        assert nli_label(*clean_text) == pairs.clean_answer[i]
        assert nli_label(*corrupt_text) == pairs.corrupt_answer[i]
        clean_sc, corrupt_sc = shortcut_labels(*clean_text), shortcut_labels(*corrupt_text)
        assert clean_sc[b] == meta["clean_bias_label"][i] and corrupt_sc[b] == meta["corrupt_bias_label"][i]
        if flip == "shortcut":
            assert pairs.clean_answer[i] == pairs.corrupt_answer[i]
            assert clean_sc[b] != corrupt_sc[b]
            # no other shortcut moves
            assert all(clean_sc[o] == corrupt_sc[o] for o in KNOWN_BIASES if o != b)
        else:
            assert pairs.clean_answer[i] != pairs.corrupt_answer[i]
            assert clean_sc[b] == corrupt_sc[b] and clean_sc[b] >= 0
    again = task.counterfactual_pairs(n=60, flip=flip, bias=bias, seed=3)
    assert torch.equal(again.clean, pairs.clean) and torch.equal(again.corrupt, pairs.corrupt)


def test_augmentation_is_conflicting_new_and_train_shaped(task):
    aug = task.augmentation(n=300, seed=0)
    assert len(aug) == 300 and aug.inputs.shape[1] == task.train.inputs.shape[1]
    assert aug.conflicting().all()
    assert set(aug.token_classes) == set(task.train.token_classes)
    counts = torch.bincount(aug.labels, minlength=3)
    assert counts.max() - counts.min() <= 2
    rows = lambda s: {tuple(r) for r in s.inputs.tolist()}  # noqa: E731
    assert not rows(aug) & (rows(task.ood_test) | rows(task.id_test))
    assert torch.equal(task.augmentation(n=300, seed=0).inputs, aug.inputs)
    assert not torch.equal(task.augmentation(n=300, seed=1).inputs, aug.inputs)
    task.train.concat(aug)  # augmentation slots straight into the training data


def test_no_test_example_in_train(task):
    rows = lambda s: {tuple(r) for r in s.inputs.tolist()}  # noqa: E731
    assert not rows(task.train) & rows(task.ood_test)
    assert not rows(task.train) & rows(task.id_test)


def test_bad_arguments_raise():
    with pytest.raises(CircuitKDError, match=r"'overlapp'.*overlap.*negation.*cue"):
        synthetic_nli(biases=("overlapp",))
    with pytest.raises(CircuitKDError, match=r"strength\['negation'\]=1.5"):
        synthetic_nli(strength={"negation": 1.5})
    with pytest.raises(CircuitKDError, match="strength names unknown"):
        synthetic_nli(strength={"negatoin": 0.5})
    with pytest.raises(CircuitKDError, match="n_train=5 is too small"):
        synthetic_nli(n_train=5)
    with pytest.raises(CircuitKDError, match="presence"):
        synthetic_nli(presence=0.9)
    with pytest.raises(CircuitKDError, match="empty"):
        synthetic_nli(biases=())
    task = synthetic_nli(n_train=60, n_id=30, n_ood=30, biases=("cue",))
    with pytest.raises(CircuitKDError, match="unknown bias type 'overlap'"):
        task.counterfactual_pairs(n=4, bias="overlap")
    with pytest.raises(CircuitKDError, match="flip"):
        task.counterfactual_pairs(n=4, flip="both")


def structure(premise, hypothesis):
    """(roles, verb relation, negated) of a pair, read off its words."""
    p_words, h_words = premise.split(), hypothesis.split()
    p_nouns = [w for w in p_words if w in LEX.noun_set]
    h_nouns = [w for w in h_words if w in LEX.noun_set]
    p_verb = next(w for w in p_words if w in LEX.verb_concept)
    h_verb = next(w for w in h_words if w in LEX.verb_concept)
    roles = "same" if h_nouns == p_nouns else ("swap" if h_nouns == p_nouns[::-1] else "new")
    p_c, h_c = LEX.verb_concept[p_verb], LEX.verb_concept[h_verb]
    relation = "same" if p_verb == h_verb else "synonym" if p_c == h_c else "antonym" if h_c == p_c ^ 1 else "other"
    return roles, relation, any(w in LEX.negations for w in h_words)


def test_unbiased_task_covers_every_structure():
    # with every shortcut at chance strength each rule of the world must still be exercised
    task = synthetic_nli(seed=0, n_train=3000, n_id=30, n_ood=30, strength=1 / 3)
    seen = collections.Counter(structure(*texts(task.tokenizer, row)) for row in task.train.inputs)
    # The shipped world has one verb pair, so no verb is unrelated to the premise's ("other").
    expected = {(r, v, n) for r in ("same", "swap", "new") for v in ("same", "synonym", "antonym")
                for n in (False, True)}
    assert set(seen) == expected
    assert min(seen.values()) >= 10


def _lexicon_with(**changes):
    import json
    import os
    import tempfile

    from circuitkd.data.synthetic_nli import _DEFAULT_LEXICON

    raw = json.loads(open(_DEFAULT_LEXICON).read())
    raw.update(changes)
    path = os.path.join(tempfile.mkdtemp(), "lexicon.json")
    with open(path, "w") as f:
        json.dump(raw, f)
    return path


def test_premises_use_only_the_premise_verbs(task):
    assert set(LEX.premise_verbs) == {"helped", "assisted"}
    verbs = collections.Counter()
    for row in task.train.inputs[:2000]:
        premise, _ = texts(task.tokenizer, row)
        verbs.update(w for w in premise.split() if w in LEX.verb_concept)
    assert set(verbs) == set(LEX.premise_verbs)


def test_hypothesis_verb_concept_does_not_mark_neutrals():
    # Premises of one concept make a hypothesis verb's concept visible on its own; neutrals
    # must carry antonyms at the rate non-neutrals with the same negation do, or the
    # antonym verbs would become a hypothesis-only cue for "neutral".
    task = synthetic_nli(seed=1, n_train=6000, n_id=30, n_ood=30, strength=0.97)
    counts = collections.Counter()
    for row, label in zip(task.train.inputs, task.train.labels.tolist()):
        _, hypothesis = texts(task.tokenizer, row)
        words = hypothesis.split()
        antonym = any(w in LEX.concepts[1] for w in words)
        negated = any(w in LEX.negations for w in words)
        counts[(label == NEUTRAL, negated, antonym)] += 1
    for negated in (False, True):
        rates = [counts[(neutral, negated, True)] / max(1, counts[(neutral, negated, True)] + counts[(neutral, negated, False)])
                 for neutral in (False, True)]
        assert abs(rates[0] - rates[1]) < 0.02, (negated, rates)
    assert task.info["neutral_antonym_rate"] is not None


def test_bad_premise_verbs_raise():
    from circuitkd.data.synthetic_nli import load_lexicon
    from circuitkd.errors import CircuitKDError

    with pytest.raises(CircuitKDError, match="not verbs of any verb pair"):
        load_lexicon(_lexicon_with(premise_verbs=["helped", "danced"]))
    with pytest.raises(CircuitKDError, match="premise_verbs is empty"):
        load_lexicon(_lexicon_with(premise_verbs=[]))
