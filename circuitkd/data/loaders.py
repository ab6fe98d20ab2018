"""Real shortcut benchmarks as :class:`Task` objects: MNLI, HANS, SNLI, Waterbirds, CelebA.

Datasets and the shortcuts annotated on them:

- MultiNLI (Williams, Nangia & Bowman 2018, "A Broad-Coverage Challenge Corpus for Sentence
  Understanding through Inference"): "overlap" (every hypothesis word occurs in the premise,
  predicts entailment; the heuristic of McCoy et al. 2019), "negation" (a negation word in the
  hypothesis, predicts contradiction; Gururangan et al. 2018), "cue" (read from a ``cue``
  column when the file has one, else -1). Groups are label × negation, as in Sagawa et al. 2020.
- HANS (McCoy, Pavlick & Linzen 2019, "Right for the Wrong Reasons"): premise/hypothesis pairs
  built so that the lexical-overlap, subsequence and constituent heuristics fail on the
  non-entailment half.
- SNLI (Bowman et al. 2015) with the "hard" subset of Gururangan et al. 2018 ("Annotation
  Artifacts in Natural Language Inference Data"): test examples that a hypothesis-only
  classifier gets wrong. The classifier here is a bag-of-words logistic regression over the
  hypothesis tokens, trained in torch on the train split.
- Waterbirds (Sagawa, Koh, Hashimoto & Liang 2020, "Distributionally Robust Neural Networks"):
  birds (y) on land or water backgrounds ("place").
- CelebA (Liu, Luo, Wang & Tang 2015, "Deep Learning Face Attributes in the Wild"), with the
  Blond_Hair × Male setting of Sagawa et al. 2020.

How each benchmark maps onto the splits train / id_test / ood_test:

============  ===================  ===============================  ==========================================
benchmark     train                id_test                          ood_test (extra splits)
============  ===================  ===============================  ==========================================
MNLI          train                validation_matched (all)         HANS evaluation set if ``hans=`` is given,
                                                                    else the bias-conflicting part of
                                                                    validation_matched ("conflicting")
HANS          train (empty if no   evaluation set, entailment half  evaluation set, non-entailment half
              train file)          (heuristics right)               (heuristics wrong) ("hans": all of it)
SNLI          train                validation                       test examples the hypothesis-only model
                                                                    gets wrong if ``hard`` else all of test
                                                                    ("test", "hard")
Waterbirds    split 0              split 2, y == place              split 2, y != place (minority groups)
                                   (majority groups)                ("val": split 1)
CelebA        partition 0          partition 2, bias-aligned        partition 2, bias-conflicting
                                                                    ("val": partition 1)
============  ===================  ===============================  ==========================================

For Waterbirds and CelebA id_test ∪ ood_test is the whole test split, so worst-group accuracy
over both is the benchmark's usual number.

Text sources are a local file, a local folder, a mapping ``{split: file}`` or a Hugging Face
hub name; they are read with ``datasets`` (json/jsonl, csv, tsv/txt read without quoting as in
the GLUE and HANS files, parquet). A local path never touches the network. Examples without a
gold label (-1, or "-" in the original jsonl/tsv files) are dropped and counted in
``Task.info["n_unlabelled_dropped"]``.
"""
from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from circuitkd.data.task import Split, Task
from circuitkd.errors import CircuitKDError

PathLike = Union[str, os.PathLike]
Source = Union[PathLike, Mapping[str, PathLike]]

NLI_LABELS = ("entailment", "neutral", "contradiction")
HANS_LABELS = ("entailment", "non-entailment")
ENTAILMENT, NEUTRAL, CONTRADICTION = 0, 1, 2
# An MNLI-trained model's 3-way prediction p counts as correct on HANS when HANS_PREDICTION_MAP[p]
# equals the 2-way gold label: neutral and contradiction both mean non-entailment (McCoy et al. 2019).
HANS_PREDICTION_MAP = (0, 1, 1)
HANS_HEURISTICS = ("lexical_overlap", "subsequence", "constituent")
NEGATION_WORDS = frozenset({"no", "not", "never", "nobody", "nothing", "none", "nowhere", "neither", "nor",
                            "cannot", "n't"})
TABLE_EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv", ".txt", ".parquet")
_UNLABELLED = (-1, "-", "", None)

# Logical split -> file stems looked for in a local folder (first match wins).
_MNLI_FILES = {
    "train": ("train", "multinli_1.0_train"),
    "validation": ("validation_matched", "dev_matched", "multinli_1.0_dev_matched", "validation", "dev"),
}
_SNLI_FILES = {
    "train": ("train", "snli_1.0_train"),
    "validation": ("validation", "dev", "snli_1.0_dev"),
    "test": ("test", "snli_1.0_test"),
}
_HANS_FILES = {
    "train": ("train", "heuristics_train_set"),
    "evaluation": ("validation", "heuristics_evaluation_set", "evaluation", "test", "dev"),
}
_HUB_SPLITS = {
    "mnli": {"train": "train", "validation": "validation_matched"},
    "snli": {"train": "train", "validation": "validation", "test": "test"},
    "hans": {"train": "train", "evaluation": "validation"},
}


# --------------------------------------------------------------------------------------------
# Reading tables
# --------------------------------------------------------------------------------------------

def _looks_local(source: PathLike) -> bool:
    """A path (existing or not) rather than a hub name like "nyu-mll/glue"."""
    if isinstance(source, os.PathLike):
        return True
    text = str(source)
    if Path(text).exists() or text.startswith(("/", ".", "~")) or text.endswith(os.sep):
        return True
    return Path(text).suffix.lower() in TABLE_EXTENSIONS or text.count("/") > 1


def _read_file(path: Path, cache_dir: Optional[str]) -> dict[str, list]:
    """One local table file as column name -> values, read with ``datasets``."""
    import datasets

    if not path.is_file():
        raise CircuitKDError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    kwargs: dict[str, Any] = {"data_files": str(path), "split": "train", "cache_dir": cache_dir}
    if suffix in (".jsonl", ".json"):
        builder = "json"
    elif suffix == ".parquet":
        builder = "parquet"
    elif suffix == ".csv":
        builder, kwargs["keep_default_na"] = "csv", False
    elif suffix in (".tsv", ".txt"):
        # GLUE, MultiNLI, SNLI and HANS tsv files contain unbalanced quotes: read them unquoted.
        builder = "csv"
        kwargs.update(delimiter="\t", quoting=csv.QUOTE_NONE, keep_default_na=False)
    else:
        raise CircuitKDError(f"cannot read {path}: expected one of {', '.join(TABLE_EXTENSIONS)}")
    try:
        table = datasets.load_dataset(builder, **kwargs)
    except Exception as err:  # datasets raises many types for malformed files
        raise CircuitKDError(f"could not read {path} as {builder}: {type(err).__name__}: {err}") from err
    return table.to_dict()


def _find_in_folder(folder: Path, stems: Iterable[str]) -> Optional[Path]:
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in TABLE_EXTENSIONS]
    for stem in stems:
        for p in files:
            name = p.name.lower()[: -len(p.suffix)]
            if name == stem or name.startswith(stem + "-0"):  # hub parquet shards: train-00000-of-00001
                return p
    return None


def _n_rows(table: dict[str, list]) -> int:
    return len(next(iter(table.values()))) if table else 0


def _take(table: dict[str, list], idx: Iterable[int]) -> dict[str, list]:
    idx = list(idx)
    return {k: [v[i] for i in idx] for k, v in table.items()}


def _holdout(table: dict[str, list], fractions: dict[str, float], seed: int) -> dict[str, dict[str, list]]:
    """Split one table at random into parts of the given fractions (the last part takes the rest)."""
    n = _n_rows(table)
    order = np.random.default_rng(seed).permutation(n)
    parts, start = {}, 0
    names = list(fractions)
    for i, name in enumerate(names):
        stop = n if i == len(names) - 1 else start + int(round(fractions[name] * n))
        parts[name] = _take(table, sorted(order[start:stop].tolist()))
        start = stop
    return parts


def _read_tables(source: Source, files: dict[str, tuple[str, ...]], *, hub_key: str, config: Optional[str],
                 single_file: dict[str, float], required: tuple[str, ...], seed: int,
                 cache_dir: Optional[str]) -> tuple[dict[str, dict[str, list]], dict[str, str]]:
    """The tables of ``source`` keyed by logical split, and where each came from.

    ``files``: logical split -> file stems to look for in a folder. ``single_file``: how a
    single file is divided among the logical splits. ``required``: logical splits that must exist.
    """
    origin: dict[str, str] = {}
    if isinstance(source, Mapping):
        tables = {}
        for key, path in source.items():
            logical = next((k for k, stems in files.items() if key == k or key in stems), None)
            if logical is None:
                raise CircuitKDError(f"unknown split {key!r} in the file mapping; expected one of {sorted(files)}")
            tables[logical] = _read_file(Path(path).expanduser(), cache_dir)
            origin[logical] = str(path)
    elif _looks_local(source):
        path = Path(source).expanduser()
        if not path.exists():
            raise CircuitKDError(f"data path not found: {path}")
        if path.is_file():
            whole = _read_file(path, cache_dir)
            tables = _holdout(whole, single_file, seed) if len(single_file) > 1 else {next(iter(single_file)): whole}
            origin = {k: f"{path} ({frac:.0%} at random)" if len(single_file) > 1 else str(path)
                      for k, frac in single_file.items()}
        else:
            tables = {}
            for logical, stems in files.items():
                found = _find_in_folder(path, stems)
                if found is not None:
                    tables[logical] = _read_file(found, cache_dir)
                    origin[logical] = str(found)
    else:
        tables = _read_hub(str(source), config, _HUB_SPLITS[hub_key], cache_dir)
        origin = {k: f"{source}:{v}" for k, v in _HUB_SPLITS[hub_key].items() if k in tables}
    missing = [k for k in required if k not in tables]
    if missing:
        wanted = "; ".join(f"{k}: one of {', '.join(s + '.<ext>' for s in files[k])}" for k in missing)
        raise CircuitKDError(f"{source} lacks the {', '.join(missing)} split(s) ({wanted})")
    return tables, origin


def _read_hub(name: str, config: Optional[str], splits: dict[str, str], cache_dir: Optional[str]) -> dict:
    import datasets

    try:
        loaded = datasets.load_dataset(name, config, cache_dir=cache_dir)
    except Exception as err:  # offline, unknown name, gated: all mean "use a local copy"
        raise CircuitKDError(
            f"could not load {name!r} (config {config!r}) from the Hugging Face hub: {type(err).__name__}: {err}; "
            f"pass a local file or folder instead"
        ) from err
    return {logical: loaded[hub].to_dict() for logical, hub in splits.items() if hub in loaded}


def _subsample(table: dict[str, list], n: Optional[int], seed: int) -> dict[str, list]:
    """At most ``n`` rows, chosen at random but kept in file order."""
    total = _n_rows(table)
    if n is None or total <= n:
        return table
    return _take(table, sorted(np.random.default_rng(seed).choice(total, size=n, replace=False).tolist()))


# --------------------------------------------------------------------------------------------
# NLI rows: columns, labels, text-level shortcut annotations
# --------------------------------------------------------------------------------------------

def _column(table: dict[str, list], names: tuple[str, ...]) -> Optional[str]:
    return next((c for c in names if c in table), None)


def _nli_rows(table: dict[str, list], where: str, label_names: tuple[str, ...], *,
              extra: tuple[str, ...] = (), optional: tuple[str, ...] = ()) -> tuple[dict[str, list], int]:
    """premise / hypothesis / label (+ ``extra``, + ``optional`` when present) columns; unlabelled rows dropped.

    Accepts both the hub column names (premise, hypothesis, label) and the original files'
    (sentence1, sentence2, gold_label). Returns the rows and how many unlabelled ones were dropped.
    """
    cols = {"premise": _column(table, ("premise", "sentence1")),
            "hypothesis": _column(table, ("hypothesis", "sentence2")),
            "label": _column(table, ("label", "gold_label"))}
    for name in extra:
        cols[name] = _column(table, (name,))
    present_optional = [name for name in optional if name in table]
    absent = [k for k, v in cols.items() if v is None]
    if absent:
        spelled = {"premise": "premise/sentence1", "hypothesis": "hypothesis/sentence2", "label": "label/gold_label"}
        raise CircuitKDError(
            f"{where} lacks required column(s) {', '.join(spelled.get(a, a) for a in absent)}; "
            f"it has {sorted(table)}"
        )
    by_name = {name: i for i, name in enumerate(label_names)}
    keep, labels, bad = [], [], set()
    for i, raw in enumerate(table[cols["label"]]):
        value = raw.strip() if isinstance(raw, str) else raw
        if isinstance(value, str) and re.fullmatch(r"-?\d+", value):
            value = int(value)
        if value in _UNLABELLED:
            continue
        label = by_name.get(value.lower()) if isinstance(value, str) else value
        if not isinstance(label, (int, np.integer)) or isinstance(label, bool) or not 0 <= label < len(label_names):
            bad.add(repr(raw))
            continue
        keep.append(i)
        labels.append(int(label))
    if bad:
        raise CircuitKDError(
            f"{where} has labels outside the declared classes {list(label_names)} "
            f"(or 0..{len(label_names) - 1}): {', '.join(sorted(bad)[:5])}"
        )
    text = lambda v: "" if v is None else str(v)  # noqa: E731
    rows = {
        "premise": [text(table[cols["premise"]][i]) for i in keep],
        "hypothesis": [text(table[cols["hypothesis"]][i]) for i in keep],
        "label": labels,
    }
    for name in extra:
        rows[name] = [table[cols[name]][i] for i in keep]
    for name in present_optional:
        rows[name] = [table[name][i] for i in keep]
    return rows, _n_rows(table) - len(keep)


def words(text: str) -> list[str]:
    """Lower-cased word tokens, with "n't" split off ("don't" -> "do", "n't") as in the Penn Treebank."""
    return re.findall(r"n't|[a-z0-9]+", text.lower().replace("n't", " n't"))


def text_biases(premises: list[str], hypotheses: list[str]) -> dict[str, Int[Tensor, " n"]]:
    """Shortcut labels computed from the text, in MNLI's 3-way label space (-1 = shortcut absent).

    "overlap" -> entailment when every hypothesis word occurs in the premise (McCoy et al. 2019);
    "negation" -> contradiction when the hypothesis holds a negation word (Gururangan et al. 2018).
    """
    overlap, negation = [], []
    for premise, hypothesis in zip(premises, hypotheses):
        p_words, h_words = set(words(premise)), words(hypothesis)
        overlap.append(ENTAILMENT if h_words and set(h_words) <= p_words else -1)
        negation.append(CONTRADICTION if NEGATION_WORDS.intersection(h_words) else -1)
    return {"overlap": torch.tensor(overlap, dtype=torch.long), "negation": torch.tensor(negation, dtype=torch.long)}


def _cue_labels(rows: dict[str, list], n_classes: int, where: str) -> Tensor:
    if "cue" not in rows:
        return torch.full((len(rows["label"]),), -1, dtype=torch.long)
    values = torch.tensor([-1 if v in (None, "") else int(v) for v in rows["cue"]], dtype=torch.long)
    if bool(((values < -1) | (values >= n_classes)).any()):
        raise CircuitKDError(f"{where} has cue labels outside -1..{n_classes - 1}")
    return values


# --------------------------------------------------------------------------------------------
# Tokenising premise/hypothesis pairs
# --------------------------------------------------------------------------------------------

def _special_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", None) or [])
    for attr in ("cls_token_id", "sep_token_id", "pad_token_id", "bos_token_id", "eos_token_id", "mask_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            ids.add(value)
    ids.discard(getattr(tokenizer, "unk_token_id", None))  # unknown words are still words
    return ids


def _single_token_ids(tokenizer, vocabulary: Iterable[str], special: set[int]) -> set[int]:
    """Ids of the words in ``vocabulary`` that the tokenizer keeps as one known token."""
    unk = getattr(tokenizer, "unk_token_id", None)
    out = set()
    for word in sorted(vocabulary):
        ids = [i for i in torch.as_tensor(tokenizer(word)["input_ids"]).flatten().tolist() if i not in special]
        if len(ids) == 1 and ids[0] != unk:
            out.add(ids[0])
    return out


def encode_pairs(tokenizer, premises: list[str], hypotheses: list[str], max_len: int
                 ) -> tuple[Int[Tensor, "n pos"], Int[Tensor, "n pos"], dict[str, Bool[Tensor, "n pos"]]]:
    """Token ids, attention mask and token classes of premise/hypothesis pairs.

    Works with any Hugging Face-style tokenizer (``tok(text, text_pair, padding=True,
    truncation=True, max_length=..., return_tensors="pt")``). The segments come from
    ``token_type_ids`` when the tokenizer returns them, else from the first separator token.

    Token classes (all ``Bool[n pos]``, special and padding tokens excluded): "premise",
    "hypothesis", "overlap" (hypothesis tokens whose id also occurs in the premise) and
    "negation" (hypothesis tokens that are a negation word on their own).
    """
    if not premises:
        empty = torch.zeros(0, 1, dtype=torch.long)
        names = ("premise", "hypothesis", "overlap", "negation")
        return empty, empty.clone(), {k: torch.zeros(0, 1, dtype=torch.bool) for k in names}
    call = dict(padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    try:
        enc = tokenizer(premises, hypotheses, return_token_type_ids=True, **call)
    except TypeError:  # a tokenizer without that keyword: segments are found from the separator
        enc = tokenizer(premises, hypotheses, **call)
    ids = torch.as_tensor(enc["input_ids"], dtype=torch.long)
    mask = torch.as_tensor(enc["attention_mask"], dtype=torch.long)
    special = _special_ids(tokenizer)
    real = mask.bool() & ~torch.isin(ids, torch.tensor(sorted(special), dtype=torch.long))
    if enc.get("token_type_ids") is not None and bool((torch.as_tensor(enc["token_type_ids"]) > 0).any()):
        second = torch.as_tensor(enc["token_type_ids"]).bool()
    else:
        sep = getattr(tokenizer, "sep_token_id", None)
        if sep is None:
            raise CircuitKDError("the tokenizer returns no token_type_ids and has no sep_token_id: "
                                 "cannot tell premise from hypothesis tokens")
        is_sep = (ids == sep).long()
        second = (is_sep.cumsum(1) - is_sep) >= 1  # strictly after the first separator
    premise, hypothesis = real & ~second, real & second
    overlap = torch.zeros_like(premise)
    for lo in range(0, ids.shape[0], 512):  # [chunk, pos, pos] comparisons, bounded memory
        sl = slice(lo, lo + 512)
        same = ids[sl, :, None] == ids[sl, None, :]
        overlap[sl] = (same & premise[sl, None, :]).any(-1) & hypothesis[sl]
    neg_ids = _single_token_ids(tokenizer, NEGATION_WORDS, special)
    negation = hypothesis & torch.isin(ids, torch.tensor(sorted(neg_ids), dtype=torch.long))
    return ids, mask, {"premise": premise, "hypothesis": hypothesis, "overlap": overlap, "negation": negation}


def _text_split(tokenizer, rows: dict[str, list], max_len: int, bias_labels: dict[str, Tensor],
                groups: Tensor) -> Split:
    ids, mask, classes = encode_pairs(tokenizer, rows["premise"], rows["hypothesis"], max_len)
    return Split(inputs=ids, labels=torch.tensor(rows["label"], dtype=torch.long).reshape(-1),
                 bias_labels=bias_labels, groups=groups, attention_mask=mask, token_classes=classes)


def _bias_stats(split: Split) -> dict[str, dict[str, float]]:
    """Per bias type: fraction of examples holding it, and how often it agrees with the gold label."""
    out = {}
    for name, b in split.bias_labels.items():
        present = b >= 0
        n_present = int(present.sum())
        out[name] = {"present": n_present / max(len(split), 1),
                     "agrees": float((b[present] == split.labels[present]).float().mean()) if n_present else float("nan")}
    return out


# --------------------------------------------------------------------------------------------
# MNLI and HANS
# --------------------------------------------------------------------------------------------

def _mnli_split(tokenizer, rows: dict[str, list], max_len: int, where: str) -> Split:
    biases = text_biases(rows["premise"], rows["hypothesis"])
    biases["cue"] = _cue_labels(rows, 3, where)
    labels = torch.tensor(rows["label"], dtype=torch.long).reshape(-1)
    groups = labels * 2 + (biases["negation"] >= 0).long()
    return _text_split(tokenizer, rows, max_len, biases, groups)


def _hans_rows(table: dict[str, list], where: str) -> tuple[dict[str, list], int]:
    return _nli_rows(table, where, HANS_LABELS, extra=("heuristic",), optional=("subcase",))


def _hans_split(tokenizer, rows: dict[str, list], max_len: int, heuristics: tuple[str, ...],
                group_offset: int) -> Split:
    """A HANS split with 2-way gold labels (0 entailment, 1 non-entailment) and gold-space bias labels."""
    biases = text_biases(rows["premise"], rows["hypothesis"])
    # In the 2-way gold space contradiction means non-entailment.
    biases = {k: torch.where(v >= 0, torch.tensor(HANS_PREDICTION_MAP)[v.clamp(min=0)], v) for k, v in biases.items()}
    biases["cue"] = torch.full((len(rows["label"]),), -1, dtype=torch.long)
    labels = torch.tensor(rows["label"], dtype=torch.long).reshape(-1)
    heuristic = torch.tensor([heuristics.index(str(h)) for h in rows["heuristic"]], dtype=torch.long)
    groups = group_offset + heuristic * 2 + labels
    return _text_split(tokenizer, rows, max_len, biases, groups)


def _heuristics(*row_sets: dict[str, list]) -> tuple[str, ...]:
    seen = {str(h) for rows in row_sets for h in rows["heuristic"]}
    return HANS_HEURISTICS + tuple(sorted(seen - set(HANS_HEURISTICS)))


def load_mnli(path_or_name: Source = "nyu-mll/glue", *, tokenizer, max_len: int = 128, n: Optional[int] = None,
              hans: Optional[Source] = None, config: Optional[str] = None, seed: int = 0,
              cache_dir: Optional[str] = None) -> Task:
    """MultiNLI (Williams et al. 2018) with overlap / negation / cue shortcut annotations.

    Args:
        path_or_name: a folder holding train and validation_matched files (``train.jsonl``,
            ``dev_matched.tsv``, ``multinli_1.0_train.jsonl``, hub parquet shards, ...), a mapping
            ``{"train": file, "validation_matched": file}``, one file (split 80/20 at random into
            train and validation), or a hub name (config "mnli" for GLUE).
        tokenizer: any Hugging Face-style tokenizer (see :func:`encode_pairs`).
        max_len: tokens per example after truncation.
        n: at most this many examples per split (chosen at random with ``seed``).
        hans: a HANS file, folder or hub name; when given its evaluation set is ood_test.
        config: hub configuration (default "mnli" for names ending in "glue").
        seed: the subsampling / single-file split seed.
        cache_dir: ``datasets`` cache folder.

    Returns:
        A text :class:`Task` (labels 0 entailment / 1 neutral / 2 contradiction; inputs
        ``Int[n pos]``, attention masks, token classes premise / hypothesis / overlap /
        negation). Splits: train, id_test (all of validation_matched), "conflicting" (the
        validation examples where overlap, negation or cue predicts a wrong label), ood_test
        (HANS when ``hans`` is given, with 2-way gold labels read through
        ``info["prediction_map"]["ood_test"]``; else "conflicting"). Groups: label × negation
        (Sagawa et al. 2020), plus heuristic × label for HANS.
    """
    if config is None and not isinstance(path_or_name, Mapping) and not _looks_local(path_or_name):
        config = "mnli" if str(path_or_name).rstrip("/").endswith("glue") else None
    tables, origin = _read_tables(path_or_name, _MNLI_FILES, hub_key="mnli", config=config,
                                  single_file={"train": 0.8, "validation": 0.2}, required=("train", "validation"),
                                  seed=seed, cache_dir=cache_dir)
    splits: dict[str, Split] = {}
    dropped: dict[str, int] = {}
    for logical, name in (("train", "train"), ("validation", "id_test")):
        rows, dropped[name] = _nli_rows(tables[logical], origin[logical], NLI_LABELS, optional=("cue",))
        rows = _subsample(rows, n, seed)
        splits[name] = _mnli_split(tokenizer, rows, max_len, origin[logical])
    splits["conflicting"] = splits["id_test"].subset(splits["id_test"].conflicting())
    group_names = tuple(f"{label}|{neg}" for label in NLI_LABELS for neg in ("no_negation", "negation"))
    info: dict[str, Any] = {
        "loader": "load_mnli", "source": str(path_or_name) if not isinstance(path_or_name, Mapping) else dict(path_or_name),
        "files": origin, "max_len": max_len, "n": n, "seed": seed,
        "split_map": {"train": "train", "id_test": "validation_matched",
                      "conflicting": "validation_matched examples where a shortcut predicts a wrong label"},
        "bias_rules": {"overlap": "every hypothesis word occurs in the premise -> entailment",
                       "negation": f"a hypothesis word in {sorted(NEGATION_WORDS)} -> contradiction",
                       "cue": "the file's 'cue' column when present, else -1"},
    }
    if hans is not None:
        hans_tables, hans_origin = _read_tables(hans, _HANS_FILES, hub_key="hans", config=None,
                                                single_file={"evaluation": 1.0}, required=("evaluation",),
                                                seed=seed, cache_dir=cache_dir)
        rows, dropped["ood_test"] = _hans_rows(hans_tables["evaluation"], hans_origin["evaluation"])
        rows = _subsample(rows, n, seed)
        heuristics = _heuristics(rows)
        splits["ood_test"] = _hans_split(tokenizer, rows, max_len, heuristics, group_offset=len(group_names))
        group_names += tuple(f"hans:{h}|{label}" for h in heuristics for label in HANS_LABELS)
        info["split_map"]["ood_test"] = "HANS evaluation set (" + hans_origin["evaluation"] + ")"
        info["prediction_map"] = {"ood_test": HANS_PREDICTION_MAP}
        info["gold_labels"] = {"ood_test": HANS_LABELS}
    else:
        splits["ood_test"] = splits["conflicting"]
        info["split_map"]["ood_test"] = "the 'conflicting' split"
    info["n_unlabelled_dropped"] = dropped
    info["sizes"] = {k: len(v) for k, v in splits.items()}
    info["bias_stats"] = {k: _bias_stats(v) for k, v in splits.items()}
    return Task(name="mnli", modality="text", n_classes=3, label_names=NLI_LABELS,
                bias_types=("overlap", "negation", "cue"), group_names=group_names, splits=splits,
                tokenizer=tokenizer, info=info)


def load_hans(path_or_name: Source = "hans", *, tokenizer, max_len: int = 128, n: Optional[int] = None,
              three_class: bool = True, config: Optional[str] = None, seed: int = 0,
              cache_dir: Optional[str] = None) -> Task:
    """HANS (McCoy et al. 2019): where the overlap heuristics of NLI models break.

    Reads the hub format (premise, hypothesis, label 0 entailment / 1 non-entailment,
    heuristic, subcase) and the original tsv (gold_label "entailment" / "non-entailment",
    sentence1, sentence2, heuristic, subcase, ...). ``path_or_name`` is a folder (train:
    ``heuristics_train_set.*`` / ``train.*``; evaluation: ``heuristics_evaluation_set.*`` /
    ``validation.*``), a mapping, one file (the evaluation set) or a hub name (the legacy
    script dataset "hans" needs a ``datasets`` that still runs scripts; "jhu-cogsci/hans" is the
    same data).

    Gold labels are 2-way: 0 entailment, 1 non-entailment. With ``three_class=True`` (the
    default, for models trained on 3-way MNLI) the task declares ``n_classes=3`` and
    ``info["prediction_map"][split] == (0, 1, 1)``: a prediction p is correct when
    ``prediction_map[p] == label``, i.e. neutral and contradiction both count as
    non-entailment. With ``three_class=False`` the task declares ``n_classes=2`` and
    predictions compare with the labels directly. Bias labels ("overlap", "negation", "cue")
    are in the 2-way gold space.

    Splits: train (HANS train set; empty ``Int[0 1]`` when there is none), id_test (the
    evaluation set's entailment half, where the heuristics are right), ood_test (its
    non-entailment half, where they are wrong), "hans" (the whole evaluation set). Groups:
    heuristic × label, named like "lexical_overlap|non-entailment".
    """
    tables, origin = _read_tables(path_or_name, _HANS_FILES, hub_key="hans", config=config,
                                  single_file={"evaluation": 1.0}, required=("evaluation",), seed=seed,
                                  cache_dir=cache_dir)
    evaluation, dropped_eval = _hans_rows(tables["evaluation"], origin["evaluation"])
    evaluation = _subsample(evaluation, n, seed)
    if "train" in tables:
        train, dropped_train = _hans_rows(tables["train"], origin["train"])
        train = _subsample(train, n, seed)
    else:
        train, dropped_train = {"premise": [], "hypothesis": [], "label": [], "heuristic": []}, 0
    heuristics = _heuristics(evaluation, train)
    whole = _hans_split(tokenizer, evaluation, max_len, heuristics, group_offset=0)
    splits = {
        "train": _hans_split(tokenizer, train, max_len, heuristics, group_offset=0),
        "id_test": whole.subset(whole.labels == ENTAILMENT),
        "ood_test": whole.subset(whole.labels != ENTAILMENT),
        "hans": whole,
    }
    info: dict[str, Any] = {
        "loader": "load_hans", "source": str(path_or_name) if not isinstance(path_or_name, Mapping) else dict(path_or_name),
        "files": origin, "max_len": max_len, "n": n, "seed": seed, "three_class": three_class,
        "gold_labels": HANS_LABELS,
        "split_map": {"train": "HANS train set", "id_test": "evaluation set, entailment",
                      "ood_test": "evaluation set, non-entailment", "hans": "evaluation set"},
        "n_unlabelled_dropped": {"train": dropped_train, "hans": dropped_eval},
        "sizes": {k: len(v) for k, v in splits.items()},
        "heuristic_counts": {h: int(sum(str(x) == h for x in evaluation["heuristic"])) for h in heuristics},
    }
    if three_class:
        info["prediction_map"] = {k: HANS_PREDICTION_MAP for k in splits}
    return Task(name="hans", modality="text", n_classes=3 if three_class else 2,
                label_names=NLI_LABELS if three_class else HANS_LABELS,
                bias_types=("overlap", "negation", "cue"),
                group_names=tuple(f"{h}|{label}" for h in heuristics for label in HANS_LABELS),
                splits=splits, tokenizer=tokenizer, info=info)


# --------------------------------------------------------------------------------------------
# SNLI with a hypothesis-only bias model
# --------------------------------------------------------------------------------------------

class HypothesisOnlyModel(torch.nn.Module):
    """Bag-of-words logistic regression over hypothesis tokens (the artefact probe of Gururangan et al. 2018)."""

    def __init__(self, vocab_size: int, n_classes: int) -> None:
        super().__init__()
        self.weight = torch.nn.EmbeddingBag(vocab_size, n_classes, mode="sum")
        self.bias = torch.nn.Parameter(torch.zeros(n_classes))
        torch.nn.init.zeros_(self.weight.weight)  # zero start: the fit depends only on the data order

    def forward(self, ids: Int[Tensor, "batch pos"], hypothesis: Bool[Tensor, "batch pos"]
                ) -> Float[Tensor, "batch n_classes"]:
        return self.weight(ids, per_sample_weights=hypothesis.float()) + self.bias

    @torch.no_grad()
    def predict(self, ids: Int[Tensor, "batch pos"], hypothesis: Bool[Tensor, "batch pos"]) -> Int[Tensor, " batch"]:
        out = [self(ids[lo:lo + 4096], hypothesis[lo:lo + 4096]).argmax(-1) for lo in range(0, ids.shape[0], 4096)]
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def fit_hypothesis_only(ids: Int[Tensor, "n pos"], hypothesis: Bool[Tensor, "n pos"], labels: Int[Tensor, " n"], *,
                        vocab_size: int, n_classes: int = 3, epochs: int = 5, lr: float = 0.05,
                        batch_size: int = 256, weight_decay: float = 1e-4, min_steps: int = 200,
                        seed: int = 0) -> HypothesisOnlyModel:
    """Train :class:`HypothesisOnlyModel` with Adam on cross-entropy; deterministic given ``seed``.

    Runs ``epochs`` passes, or more when that gives fewer than ``min_steps`` updates (a small
    training set would otherwise leave the classifier barely fitted).
    """
    model = HypothesisOnlyModel(vocab_size, n_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = max(1, -(-ids.shape[0] // batch_size))
    epochs = max(epochs, -(-min_steps // steps_per_epoch))
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(ids.shape[0], generator=generator)
            for lo in range(0, ids.shape[0], batch_size):
                batch = order[lo:lo + batch_size]
                loss = torch.nn.functional.cross_entropy(model(ids[batch], hypothesis[batch]), labels[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    return model.eval()


def load_snli(path_or_name: Source = "stanfordnlp/snli", *, tokenizer, hard: bool = True, max_len: int = 128,
              n: Optional[int] = None, config: Optional[str] = None, seed: int = 0, bias_epochs: int = 5,
              cache_dir: Optional[str] = None) -> Task:
    """SNLI with the hypothesis-only "hard" subset (Gururangan et al. 2018).

    A bag-of-words logistic regression over the hypothesis tokens (:func:`fit_hypothesis_only`,
    ``bias_epochs`` epochs, seeded) is trained on the train split; its prediction on every
    example is ``bias_labels["hypothesis"]`` (in-sample on train). "overlap" and "negation" are
    annotated as for MNLI. Examples labelled -1 (no gold label) are dropped.

    ``path_or_name``: a folder (``train`` / ``validation`` or ``dev`` / ``test`` files, or the
    ``snli_1.0_*`` originals), a mapping, one file (split 80/10/10 at random) or a hub name.

    Splits: train, id_test (validation), "test" (all of test), "hard" (test examples the
    hypothesis-only model gets wrong), ood_test ("hard" if ``hard`` else "test"). Groups:
    label × easy/hard (whether the hypothesis-only model is right), e.g. "neutral|hard".
    ``info["hypothesis_only_acc"]`` records the bias model's accuracy per split.
    """
    tables, origin = _read_tables(path_or_name, _SNLI_FILES, hub_key="snli", config=config,
                                  single_file={"train": 0.8, "validation": 0.1, "test": 0.1},
                                  required=("train", "validation", "test"), seed=seed, cache_dir=cache_dir)
    encoded: dict[str, tuple] = {}
    dropped: dict[str, int] = {}
    for logical in ("train", "validation", "test"):
        rows, dropped[logical] = _nli_rows(tables[logical], origin[logical], NLI_LABELS)
        rows = _subsample(rows, n, seed)
        ids, mask, classes = encode_pairs(tokenizer, rows["premise"], rows["hypothesis"], max_len)
        encoded[logical] = (rows, ids, mask, classes)
    vocab_size = max(int(e[1].max()) + 1 if e[1].numel() else 1 for e in encoded.values())
    vocab_size = max(vocab_size, len(tokenizer) if hasattr(tokenizer, "__len__") else 0)
    train_rows, train_ids, _, train_classes = encoded["train"]
    bias_model = fit_hypothesis_only(train_ids, train_classes["hypothesis"],
                                     torch.tensor(train_rows["label"], dtype=torch.long), vocab_size=vocab_size,
                                     epochs=bias_epochs, seed=seed)
    splits: dict[str, Split] = {}
    for logical, name in (("train", "train"), ("validation", "id_test"), ("test", "test")):
        rows, ids, mask, classes = encoded[logical]
        labels = torch.tensor(rows["label"], dtype=torch.long).reshape(-1)
        hyp_pred = bias_model.predict(ids, classes["hypothesis"])
        biases = {"hypothesis": hyp_pred, **text_biases(rows["premise"], rows["hypothesis"])}
        splits[name] = Split(inputs=ids, labels=labels, bias_labels=biases,
                             groups=labels * 2 + (hyp_pred != labels).long(), attention_mask=mask,
                             token_classes=classes)
    splits["hard"] = splits["test"].subset(splits["test"].conflicting("hypothesis"))
    splits["ood_test"] = splits["hard"] if hard else splits["test"]
    info = {
        "loader": "load_snli", "source": str(path_or_name) if not isinstance(path_or_name, Mapping) else dict(path_or_name),
        "files": origin, "max_len": max_len, "n": n, "seed": seed, "hard": hard,
        "split_map": {"train": "train", "id_test": "validation", "test": "test",
                      "hard": "test examples the hypothesis-only model gets wrong",
                      "ood_test": "hard" if hard else "test"},
        "bias_model": {"kind": "bag-of-words logistic regression on hypothesis tokens", "epochs": bias_epochs,
                       "vocab_size": vocab_size, "seed": seed},
        "hypothesis_only_acc": {k: float((v.bias_labels["hypothesis"] == v.labels).float().mean()) if len(v) else float("nan")
                                for k, v in splits.items()},
        "n_unlabelled_dropped": dropped,
        "sizes": {k: len(v) for k, v in splits.items()},
        "bias_stats": {k: _bias_stats(v) for k, v in splits.items()},
    }
    return Task(name="snli", modality="text", n_classes=3, label_names=NLI_LABELS,
                bias_types=("hypothesis", "overlap", "negation"),
                group_names=tuple(f"{label}|{kind}" for label in NLI_LABELS for kind in ("easy", "hard")),
                splits=splits, tokenizer=tokenizer, info=info)


# --------------------------------------------------------------------------------------------
# Images: Waterbirds and CelebA
# --------------------------------------------------------------------------------------------

def load_image(path: Path, image_size: int) -> Float[Tensor, "3 height width"]:
    """An RGB image centre-cropped to a square and resized to ``image_size``, in [0, 1]."""
    from PIL import Image

    if not path.is_file():
        raise CircuitKDError(f"image not found: {path}")
    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = img.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((image_size, image_size), Image.BILINEAR)
        pixels = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)


def _image_split(files: list[Path], labels: Tensor, spurious: Tensor, bias_of: Tensor, image_size: int,
                 bias_name: str) -> Split:
    inputs = torch.stack([load_image(f, image_size) for f in files]) if files else torch.zeros(0, 3, image_size, image_size)
    return Split(inputs=inputs, labels=labels, bias_labels={bias_name: bias_of[spurious]}, groups=labels * 2 + spurious)


def _int_column(values: list, where: str, column: str, allowed: tuple[int, ...]) -> Tensor:
    try:
        out = torch.tensor([int(str(v).strip()) for v in values], dtype=torch.long)
    except ValueError as err:
        raise CircuitKDError(f"{where}: column {column!r} must hold integers ({err})") from err
    bad = sorted(set(out.tolist()) - set(allowed))
    if bad:
        raise CircuitKDError(f"{where}: column {column!r} has values {bad} outside the declared classes {list(allowed)}")
    return out


def _read_csv(path: Path) -> dict[str, list]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        fields = [f.strip() for f in (reader.fieldnames or [])]
    return {f: [row[raw] for row in rows] for f, raw in zip(fields, reader.fieldnames or [])}


def _cap(idx: Tensor, n: Optional[int], seed: int) -> Tensor:
    if n is None or len(idx) <= n:
        return idx
    pick = np.random.default_rng(seed).choice(len(idx), size=n, replace=False)
    return idx[torch.as_tensor(np.sort(pick), dtype=torch.long)]


def _image_task(name: str, files: list[Path], labels: Tensor, spurious: Tensor, partition: Tensor, bias_of: Tensor,
                *, bias_name: str, label_names: tuple[str, str], spurious_names: tuple[str, str], image_size: int,
                n: Optional[int], seed: int, info: dict[str, Any]) -> Task:
    """Shared by Waterbirds and CelebA: partitions 0/1/2 -> train / val / test split into aligned and conflicting."""
    aligned = bias_of[spurious] == labels
    wanted = {
        "train": partition == 0,
        "id_test": (partition == 2) & aligned,
        "ood_test": (partition == 2) & ~aligned,
        "val": partition == 1,
    }
    splits = {}
    for split_name, rows in wanted.items():
        idx = _cap(torch.nonzero(rows).flatten(), n, seed)
        splits[split_name] = _image_split([files[i] for i in idx.tolist()], labels[idx], spurious[idx], bias_of,
                                          image_size, bias_name)
    group_names = tuple(f"{ln}|{sn}" for ln in label_names for sn in spurious_names)
    info = dict(info, image_size=image_size, n=n, seed=seed,
                bias_map={spurious_names[s]: label_names[int(bias_of[s])] for s in (0, 1)},
                sizes={k: len(v) for k, v in splits.items()},
                group_counts={k: {g: int((v.groups == i).sum()) for i, g in enumerate(group_names)}
                              for k, v in splits.items()})
    return Task(name=name, modality="image", n_classes=2, label_names=label_names, bias_types=(bias_name,),
                group_names=group_names, splits=splits, tokenizer=None, info=info)


def load_waterbirds(path: PathLike, *, image_size: int = 64, n: Optional[int] = None, seed: int = 0) -> Task:
    """Waterbirds (Sagawa et al. 2020) from a WILDS-style folder.

    The folder holds ``metadata.csv`` with columns img_filename (relative to the folder), y
    (0 landbird, 1 waterbird), split (0 train, 1 val, 2 test) and place (0 land, 1 water),
    and the images. The shortcut "place" predicts the bird matching the background (water ->
    waterbird), so ``bias_labels["place"] == place``. Groups: y × place, e.g. "waterbird|land".

    Splits (inputs ``Float[n 3 image_size image_size]`` in [0, 1], centre-cropped and resized):
    train (split 0), id_test (test images in the majority groups, y == place), ood_test (test
    images in the minority groups, y != place), "val" (split 1). ``n`` caps each split
    (seeded random subset).
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise CircuitKDError(f"Waterbirds folder not found: {root}")
    meta_path = root / "metadata.csv"
    if not meta_path.is_file():
        raise CircuitKDError(f"Waterbirds metadata not found: {meta_path}")
    meta = _read_csv(meta_path)
    missing = [c for c in ("img_filename", "y", "split", "place") if c not in meta]
    if missing:
        raise CircuitKDError(f"{meta_path} lacks required column(s) {', '.join(missing)}; it has {sorted(meta)}")
    where = str(meta_path)
    labels = _int_column(meta["y"], where, "y", (0, 1))
    place = _int_column(meta["place"], where, "place", (0, 1))
    partition = _int_column(meta["split"], where, "split", (0, 1, 2))
    files = [root / f.strip() for f in meta["img_filename"]]
    info = {"loader": "load_waterbirds", "source": str(root),
            "split_map": {"train": "split 0", "id_test": "split 2, y == place", "ood_test": "split 2, y != place",
                          "val": "split 1"}}
    return _image_task("waterbirds", files, labels, place, partition, torch.tensor([0, 1]), bias_name="place",
                       label_names=("landbird", "waterbird"), spurious_names=("land", "water"),
                       image_size=image_size, n=n, seed=seed, info=info)


def _read_celeba_table(root: Path, stem: str, where_names: str) -> dict[str, list]:
    """``<stem>.csv`` (Kaggle: a header row) or ``<stem>.txt`` (the original whitespace format)."""
    csv_path, txt_path = root / f"{stem}.csv", root / f"{stem}.txt"
    if csv_path.is_file():
        table = _read_csv(csv_path)
        first = next(iter(table), None)
        if first is not None and first != "image_id":
            table["image_id"] = table.pop(first)
        return table
    if txt_path.is_file():
        lines = [line.split() for line in txt_path.read_text().splitlines() if line.strip()]
        if stem == "list_eval_partition":  # "000001.jpg 0", no header
            return {"image_id": [r[0] for r in lines], "partition": [r[1] for r in lines]}
        # list_attr_celeba.txt: a count line, a line of attribute names, then "file v1 v2 ...".
        names = lines[1]
        body = lines[2:]
        table = {"image_id": [r[0] for r in body]}
        for j, attr in enumerate(names):
            table[attr] = [r[j + 1] if len(r) > j + 1 else "" for r in body]
        return table
    raise CircuitKDError(f"CelebA {where_names} not found: neither {csv_path} nor {txt_path} exists")


def _pmi_bias(labels: Tensor, spurious: Tensor) -> Tensor:
    """For each spurious value s, the label y with the largest P(y | s) / P(y) on train.

    For CelebA's Blond_Hair × Male this gives female -> blond, male -> not blond, although
    "not blond" is the majority label for both.
    """
    out = torch.tensor([0, 1])
    p_y = torch.stack([(labels == y).float().mean() for y in (0, 1)])
    for s in (0, 1):
        rows = spurious == s
        if not bool(rows.any()) or bool((p_y == 0).any()):
            continue
        p_y_s = torch.stack([(labels[rows] == y).float().mean() for y in (0, 1)])
        out[s] = int((p_y_s / p_y).argmax())
    return out


def load_celeba(path: PathLike, *, target: str = "Blond_Hair", spurious: str = "Male", image_size: int = 64,
                n: Optional[int] = None, seed: int = 0) -> Task:
    """CelebA (Liu et al. 2015) with a target attribute and a spurious one (Sagawa et al. 2020).

    The folder holds ``list_attr_celeba.csv`` (Kaggle, header ``image_id,<attrs>``) or
    ``list_attr_celeba.txt`` (original), attribute values +1 / -1 (read as 1 / 0);
    ``list_eval_partition.csv`` or ``.txt`` (0 train, 1 val, 2 test); and the images in
    ``img_align_celeba/`` (or the Kaggle ``img_align_celeba/img_align_celeba/``).

    The shortcut, named after ``spurious``, predicts for each spurious value the label it is
    most associated with on train (largest P(y | s) / P(y); recorded in ``info["bias_map"]``).
    Splits: train (partition 0), id_test (test examples whose spurious attribute predicts their
    label), ood_test (test examples where it does not), "val" (partition 1). Inputs are
    ``Float[n 3 image_size image_size]`` in [0, 1], centre-cropped. Groups: label × spurious,
    e.g. "Blond_Hair|Male", "not_Blond_Hair|not_Male". ``n`` caps each split.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise CircuitKDError(f"CelebA folder not found: {root}")
    attrs = _read_celeba_table(root, "list_attr_celeba", "attribute list")
    parts = _read_celeba_table(root, "list_eval_partition", "partition list")
    missing = [c for c in (target, spurious) if c not in attrs]
    if missing:
        have = sorted(a for a in attrs if a != "image_id")
        raise CircuitKDError(f"CelebA attribute list lacks column(s) {', '.join(missing)}; it has {have}")
    if "partition" not in parts:
        raise CircuitKDError(f"CelebA partition list lacks column 'partition'; it has {sorted(parts)}")
    partition_of = dict(zip(parts["image_id"], parts["partition"]))
    absent = [i for i in attrs["image_id"] if i not in partition_of]
    if absent:
        raise CircuitKDError(f"CelebA partition list has no entry for {len(absent)} image(s), e.g. {absent[0]}")
    image_dir = root / "img_align_celeba"
    if (image_dir / "img_align_celeba").is_dir():
        image_dir = image_dir / "img_align_celeba"
    if not image_dir.is_dir():
        raise CircuitKDError(f"CelebA image folder not found: {image_dir}")
    where = "CelebA attribute list"
    labels = (_int_column(attrs[target], where, target, (-1, 0, 1)) == 1).long()
    spur = (_int_column(attrs[spurious], where, spurious, (-1, 0, 1)) == 1).long()
    partition = _int_column([partition_of[i] for i in attrs["image_id"]], "CelebA partition list", "partition",
                            (0, 1, 2))
    bias_of = _pmi_bias(labels[partition == 0], spur[partition == 0])
    files = [image_dir / i.strip() for i in attrs["image_id"]]
    info = {"loader": "load_celeba", "source": str(root), "target": target, "spurious": spurious,
            "split_map": {"train": "partition 0", "id_test": "partition 2, spurious attribute predicts the label",
                          "ood_test": "partition 2, spurious attribute predicts the other label", "val": "partition 1"}}
    return _image_task("celeba", files, labels, spur, partition, bias_of, bias_name=spurious,
                       label_names=(f"not_{target}", target), spurious_names=(f"not_{spurious}", spurious),
                       image_size=image_size, n=n, seed=seed, info=info)
