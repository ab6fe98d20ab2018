"""A word-level tokenizer built offline from a fixed vocabulary.

The synthetic tasks use a closed vocabulary, so a whitespace tokenizer with BERT's
special tokens (``[PAD]``, ``[CLS]``, ``[SEP]``, ``[UNK]``) is exact and needs no
download. Sentence pairs are laid out as in BERT (Devlin et al. 2019):
``[CLS] premise [SEP] hypothesis [SEP]``, right-padded with ``[PAD]`` (id 0).
``__call__`` mimics the Hugging Face tokenizer call so code written for HF
tokenizers runs unchanged.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Optional, Sequence, Union, no_type_check

import numpy as np
import torch
from torch import Tensor

from circuitkd.errors import CircuitKDError

PAD, CLS, SEP, UNK = "[PAD]", "[CLS]", "[SEP]", "[UNK]"
SPECIAL_TOKENS = (PAD, CLS, SEP, UNK)

TextPair = Union[str, tuple[str, Optional[str]], list]


class WordTokenizer:
    """Whitespace tokenizer over a fixed vocabulary; special tokens take ids 0-3 (``[PAD]`` = 0).

    Args:
        vocab: the words, in id order after the four special tokens. Special tokens in the
            list are skipped (so ``WordTokenizer(tok.tokens)`` rebuilds ``tok``); duplicates
            and words containing whitespace are refused.
        lowercase: lowercase text (and vocabulary) before lookup, like an uncased BERT.
    """

    def __init__(self, vocab: Sequence[str], *, lowercase: bool = True) -> None:
        if isinstance(vocab, str):
            raise CircuitKDError("vocab must be a list of words, got a single string")
        self.lowercase = bool(lowercase)
        tokens: list[str] = list(SPECIAL_TOKENS)
        seen = set(tokens)
        for i, word in enumerate(vocab):
            if not isinstance(word, str) or not word or any(ch.isspace() for ch in word):
                raise CircuitKDError(f"vocab entry {i} ({word!r}) is not a non-empty word without whitespace")
            if word in SPECIAL_TOKENS:
                continue
            key = word.lower() if self.lowercase else word
            if key in seen:
                raise CircuitKDError(f"vocab entry {i} ({word!r}) is a duplicate")
            seen.add(key)
            tokens.append(key)
        self.tokens: list[str] = tokens
        self._ids: dict[str, int] = {t: i for i, t in enumerate(tokens)}

    # --- sizes and special ids -------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def pad_token_id(self) -> int:
        return self._ids[PAD]

    @property
    def cls_token_id(self) -> int:
        return self._ids[CLS]

    @property
    def sep_token_id(self) -> int:
        return self._ids[SEP]

    @property
    def unk_token_id(self) -> int:
        return self._ids[UNK]

    pad_token, cls_token, sep_token, unk_token = PAD, CLS, SEP, UNK

    def get_vocab(self) -> dict[str, int]:
        """Token -> id, as HF tokenizers expose it."""
        return dict(self._ids)

    # --- single sequences -------------------------------------------------------------------
    @no_type_check  # called once per row by the batch paths
    def tokenize(self, text: str) -> list[str]:
        """Split ``text`` on whitespace (lowercased if the tokenizer is uncased)."""
        if not isinstance(text, str):
            raise CircuitKDError(f"text must be a string, got {type(text).__name__}")
        return (text.lower() if self.lowercase else text).split()

    def convert_tokens_to_ids(self, tokens: Union[str, Iterable[str]]) -> Union[int, list[int]]:
        """Id of one token, or ids of a list of tokens; unknown words map to ``[UNK]``."""
        if isinstance(tokens, str):
            return self._lookup(tokens)
        return [self._lookup(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: Union[int, Iterable[int]]) -> Union[str, list[str]]:
        """Token of one id, or tokens of a sequence of ids."""
        if isinstance(ids, int) or (isinstance(ids, Tensor) and ids.dim() == 0):
            return self._token(int(ids))
        return [self._token(int(i)) for i in ids]

    @no_type_check  # called once per token
    def _lookup(self, token: str) -> int:
        if token in self._ids:
            return self._ids[token]
        key = token.lower() if self.lowercase else token
        return self._ids.get(key, self._ids[UNK])

    @no_type_check  # called once per token
    def _token(self, idx: int) -> str:
        if not 0 <= idx < len(self.tokens):
            raise CircuitKDError(f"token id {idx} is outside the vocabulary [0, {len(self.tokens)})")
        return self.tokens[idx]

    def encode(self, premise: str, hypothesis: Optional[str] = None) -> list[int]:
        """``[CLS] premise [SEP]`` or ``[CLS] premise [SEP] hypothesis [SEP]`` as ids."""
        return self._encode(premise, hypothesis)

    @no_type_check  # called once per row by the batch paths, which check their own inputs
    def _encode(self, premise, hypothesis):
        if not isinstance(premise, str) or not (hypothesis is None or isinstance(hypothesis, str)):
            raise CircuitKDError(f"premise and hypothesis must be strings, got {premise!r} and {hypothesis!r}")
        sep = self._ids[SEP]
        ids = [self._ids[CLS], *(self._lookup(w) for w in self.tokenize(premise)), sep]
        if hypothesis is not None:
            ids += [*(self._lookup(w) for w in self.tokenize(hypothesis)), sep]
        return ids

    def decode(self, ids: Union[Sequence[int], Tensor], *, skip_special_tokens: bool = False) -> str:
        """Tokens of ``ids`` joined by spaces; ``[PAD]`` is always dropped, other specials on request."""
        if isinstance(ids, Tensor):
            if ids.dim() != 1:
                raise CircuitKDError(f"decode takes one sequence of ids, got a tensor of shape {tuple(ids.shape)}")
            ids = ids.tolist()
        drop = set(SPECIAL_TOKENS) if skip_special_tokens else {PAD}
        return " ".join(t for t in (self._token(int(i)) for i in ids) if t not in drop)

    # --- batches ----------------------------------------------------------------------------
    def batch_encode(self, pairs: Sequence[TextPair], max_len: Optional[int] = None) -> tuple[Tensor, Tensor]:
        """Encode and right-pad a batch.

        Args:
            pairs: premises (``str``) or ``(premise, hypothesis)`` pairs.
            max_len: pad every row to this many tokens; None pads to the longest row.

        Returns:
            ``input_ids`` ``Int[batch pos]`` and ``attention_mask`` ``Int[batch pos]`` (1 = real token),
            both ``torch.long``.

        Raises:
            CircuitKDError: an encoded row is longer than ``max_len``.
        """
        if isinstance(pairs, str):
            raise CircuitKDError("batch_encode takes a list of texts or (premise, hypothesis) pairs, got one string")
        rows = []
        for i, pair in enumerate(pairs):
            if isinstance(pair, str):
                rows.append(self._encode(pair, None))
            elif isinstance(pair, (tuple, list)) and len(pair) in (1, 2):
                rows.append(self._encode(pair[0], pair[1] if len(pair) == 2 else None))
            else:
                raise CircuitKDError(f"pair {i} must be a string or a (premise, hypothesis) pair, got {pair!r}")
        return self._pad(rows, max_len)

    def _pad(self, rows: list[list[int]], max_len: Optional[int]) -> tuple[Tensor, Tensor]:
        longest = max((len(r) for r in rows), default=0)
        width = longest if max_len is None else int(max_len)
        for i, row in enumerate(rows):
            if len(row) > width:
                raise CircuitKDError(f"input {i} has {len(row)} tokens, longer than max_len={width}")
        input_ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = row
            attention_mask[i, : len(row)] = 1
        return torch.from_numpy(input_ids), torch.from_numpy(attention_mask)

    def __call__(
        self,
        text: Union[str, Sequence[str]],
        text_pair: Union[str, Sequence[str], None] = None,
        padding: Union[bool, str] = True,
        truncation: bool = False,
        max_length: Optional[int] = None,
        return_tensors: Optional[str] = "pt",
        return_token_type_ids: bool = False,
    ) -> dict:
        """Hugging Face-style call: ``tok(premises, hypotheses)`` -> ``{"input_ids", "attention_mask"}``.

        ``padding`` is True / "longest" (pad to the longest row), "max_length" (pad to
        ``max_length``) or False (rows of unequal length need ``return_tensors=None``).
        ``truncation=True`` cuts rows to ``max_length`` (keeping the final ``[SEP]``); otherwise
        a row longer than ``max_length`` raises. ``return_token_type_ids`` adds BERT segment
        ids (0 up to the first ``[SEP]``, 1 after).
        """
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if text_pair is None:
            hyps: list[Optional[str]] = [None] * len(texts)
        else:
            hyps = [text_pair] if isinstance(text_pair, str) else list(text_pair)
            if len(hyps) != len(texts):
                raise CircuitKDError(f"text has {len(texts)} entries but text_pair has {len(hyps)}")
        if return_tensors not in (None, "pt"):
            raise CircuitKDError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        if padding not in (True, False, "longest", "max_length", "do_not_pad"):
            raise CircuitKDError(f"padding must be True, False, 'longest' or 'max_length', got {padding!r}")
        if padding == "max_length" and max_length is None:
            raise CircuitKDError("padding='max_length' needs max_length")
        rows = [self._encode(p, h) for p, h in zip(texts, hyps)]
        if max_length is not None:
            for i, row in enumerate(rows):
                if len(row) > max_length:
                    if not truncation:
                        raise CircuitKDError(
                            f"input {i} has {len(row)} tokens, longer than max_length={max_length} (pass truncation=True)"
                        )
                    rows[i] = row[: max_length - 1] + [self.sep_token_id]
        types = [self._token_types(r) for r in rows]
        if padding in (False, "do_not_pad"):
            if return_tensors == "pt" and len({len(r) for r in rows}) > 1:
                raise CircuitKDError("rows differ in length: pass padding=True to return tensors")
            out = {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]}
            if return_token_type_ids:
                out["token_type_ids"] = types
            if return_tensors == "pt":
                out = {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
        else:
            width = max_length if padding == "max_length" else None
            input_ids, attention_mask = self._pad(rows, width)
            out = {"input_ids": input_ids, "attention_mask": attention_mask}
            if return_token_type_ids:
                type_ids = torch.zeros_like(input_ids)
                for i, t in enumerate(types):
                    type_ids[i, : len(t)] = torch.tensor(t, dtype=torch.long)
                out["token_type_ids"] = type_ids
            if return_tensors is None:
                out = {k: v.tolist() for k, v in out.items()}
        if single and return_tensors is None:
            out = {k: v[0] for k, v in out.items()}
        return out

    @no_type_check  # called once per token
    def _token_types(self, row: list[int]) -> list[int]:
        first_sep = row.index(self.sep_token_id) if self.sep_token_id in row else len(row) - 1
        return [0 if i <= first_sep else 1 for i in range(len(row))]

    # --- persistence ------------------------------------------------------------------------
    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the vocabulary as JSON to ``path``."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"type": "WordTokenizer", "lowercase": self.lowercase, "vocab": self.tokens}, f)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "WordTokenizer":
        """Read a tokenizer written by :meth:`save`."""
        if not os.path.isfile(path):
            raise CircuitKDError(f"tokenizer file {str(path)!r} does not exist")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CircuitKDError(f"tokenizer file {str(path)!r} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict) or data.get("type") != "WordTokenizer" or "vocab" not in data:
            raise CircuitKDError(f"tokenizer file {str(path)!r} does not hold a WordTokenizer (needs type and vocab keys)")
        tokens = data["vocab"]
        if list(tokens[: len(SPECIAL_TOKENS)]) != list(SPECIAL_TOKENS):
            raise CircuitKDError(
                f"tokenizer file {str(path)!r} must start with the special tokens {list(SPECIAL_TOKENS)}"
            )
        return cls(tokens, lowercase=bool(data.get("lowercase", True)))

    def __hash__(self) -> int:
        return hash((tuple(self.tokens), self.lowercase))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WordTokenizer) and self.tokens == other.tokens and self.lowercase == other.lowercase

    def __repr__(self) -> str:
        return f"WordTokenizer(vocab_size={self.vocab_size})"
