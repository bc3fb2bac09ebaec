"""The model's own fast tokenizer, configured once and shared by the torch and ONNX backends.

Why not the ``transformers`` wrapper per call: calling the Rust tokenizer directly costs ~20 µs per
text against ~150 µs through the Python wrapper, which also re-sets truncation on every call and
is therefore unsafe across threads. The tokenizer here is a private copy, so the engine may call
``tokenize`` from the event loop and from helper threads at once.

Bounded work (a 4 MB text once froze a server for 8 s): a text contributes at most
``max_seq_tokens`` tokens, so a long text is tokenized from a prefix, not whole. The prefix ends
at a *safe cut*: a position where the tokenizer's pre-tokens split in the whole text too, so the
prefix's tokens are a prefix of the whole text's tokens (``safe_cut``). When the prefix yields
more than ``max_seq_tokens`` tokens, the cut result (ids and ``truncated``) is exactly the whole
text's; otherwise the prefix is doubled, up to the whole text (``tests/unit/backends/
test_tokenize_bound.py`` checks the equality against the real tokenizer). Texts above
``GIL_FREE_MIN_CHARS`` go through ``encode_batch``, which releases the GIL (``encode`` holds it:
a long ``encode`` on a helper thread still stalls the event loop).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from tokenizers import Tokenizer
from transformers import AutoTokenizer

from polyray.backends.base import Tokenized
from polyray.errors import ModelLoadError
from polyray.registry.model_dir import ModelDir

# A first prefix holds this many characters per allowed token (English averages 4-5): enough that
# one pass almost always suffices, small enough that it costs about a millisecond.
PREFIX_CHARS_PER_TOKEN = 16
# ``encode`` holds the GIL for its whole run; ``encode_batch`` releases it. Above this many
# characters a text goes through ``encode_batch`` so a helper thread never blocks the event loop.
GIL_FREE_MIN_CHARS = 2048
# How far back from the prefix limit a safe cut is looked for before the prefix is widened instead.
_CUT_SEARCH_FRACTION = 0.5
_SIGMA = "\u03a3"  # Python's lower() maps it by context (final sigma): the only context-dependent case
# Whitespace to every pre-tokenizer below: tab, newline, carriage return and the Unicode space
# separators (category Zs; a fixed list). Not the other control characters, which BERT deletes.
_WHITESPACE = "\t\n\r \u00a0\u1680\u2000-\u200a\u202f\u205f\u3000"
# Characters BERT always makes a pre-token of their own: ASCII punctuation and symbols, and the CJK
# ideographs its normalizer pads with spaces (non-ASCII punctuation is left out: fewer cuts, still exact).
_BERT_SPLIT = (
    r"!-/:-@\[-`{-~"
    "\u4e00-\u9fff\u3400-\u4dbf\U00020000-\U0002a6df\U0002a700-\U0002ceaf\uf900-\ufaff\U0002f800-\U0002fa1f"
)
_CUT = {
    "whitespace": re.compile(f"[{_WHITESPACE}]"),
    "bert": re.compile(f"[{_WHITESPACE}{_BERT_SPLIT}]"),
}


def cut_mode(tokenizer_json: str) -> str:
    """Which cuts keep a prefix's tokens equal to the whole text's, from the tokenizer's own config.

    ``"bert"``: BERT normalizer and pre-tokenizer: pre-tokens split at whitespace, at every
    punctuation character and around CJK ideographs. ``"whitespace"``: pre-tokenizers that split
    at whitespace (Metaspace, ByteLevel, Whitespace). ``"none"``: unknown, so long texts are
    tokenized whole (still off the event loop and without the GIL).
    """
    config = json.loads(tokenizer_json)
    pre = (config.get("pre_tokenizer") or {}).get("type")
    norm = (config.get("normalizer") or {}).get("type")
    if pre == "BertPreTokenizer" and norm in ("BertNormalizer", None):
        return "bert"
    if pre in ("Metaspace", "ByteLevel", "Whitespace", "WhitespaceSplit"):
        return "whitespace"
    return "none"


def safe_cut(text: str, limit_chars: int, mode: str, lowercase: bool) -> int | None:
    """The largest ``i <= limit_chars`` (and above half of it) at which ``text[:i]`` is a safe prefix.

    Safe: ``text[i]`` is whitespace, or (``mode == "bert"``) a character BERT always splits off.
    Both are Unicode starters, so normalization (NFD, accent stripping) cannot combine across the
    cut, and neither is case-ignorable, except ASCII ``.``, ``:`` and ``'``: with ``lowercase``
    (Python's ``lower()``, whose final-sigma rule looks past case-ignorable characters) a prefix
    holding a capital sigma is cut at whitespace only. None: no safe cut in that range.
    """
    if mode == "none" or limit_chars >= len(text):
        return None
    low = max(1, int(limit_chars * (1 - _CUT_SEARCH_FRACTION)))
    if mode == "bert" and lowercase and _SIGMA in text[:limit_chars]:
        mode = "whitespace"
    # The last match in text[low : limit + 1]: the first one in the reversed slice.
    window = text[low : limit_chars + 1]
    found = _CUT[mode].search(window[::-1])
    return None if found is None else low + len(window) - 1 - found.start()


class TextTokenizer:
    """Text → token ids with special tokens, cut to ``max_seq_tokens`` with the end token kept."""

    def __init__(self, model_dir: ModelDir, max_seq_tokens: int | None = None, hf_tokenizer: object = None) -> None:
        path = str(model_dir.transformer_path)
        if hf_tokenizer is None:
            try:
                hf_tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, use_fast=True)
            except Exception as exc:  # any failure to load stops start-up with the path in the message
                raise ModelLoadError(f"cannot load the tokenizer in {path}: {exc}") from exc
        self.hf_tokenizer = hf_tokenizer
        self.do_lower_case = model_dir.do_lower_case
        limit = model_dir.max_seq_tokens
        self.max_seq_tokens = min(limit, max_seq_tokens) if max_seq_tokens else limit
        hf = hf_tokenizer
        self.pad_id = int(getattr(hf, "pad_token_id", None) or 0)
        sep = getattr(hf, "sep_token_id", None)
        if sep is None:
            sep = getattr(hf, "eos_token_id", None)
        self.end_id = int(sep) if sep is not None else None
        # One token past the limit tells us a text was cut.
        tokenizer_json = hf.backend_tokenizer.to_str()  # type: ignore[attr-defined]
        self._fast = Tokenizer.from_str(tokenizer_json)
        self._fast.no_padding()
        self._fast.enable_truncation(max_length=self.max_seq_tokens + 1)
        self.cut_mode = cut_mode(tokenizer_json)
        self.prefix_chars = self.max_seq_tokens * PREFIX_CHARS_PER_TOKEN

    def tokenize(self, texts: Sequence[str]) -> list[Tokenized]:
        """See the module docstring: each text costs at most about ``prefix_chars`` characters of
        work unless it has no safe cut, and the result equals tokenizing it whole."""
        out: list[Tokenized | None] = [None] * len(texts)
        short = [i for i, t in enumerate(texts) if len(t) <= self.prefix_chars]
        if short:
            for i, ids in zip(short, self._encode([texts[i] for i in short]), strict=True):
                out[i] = self._finish(ids)
        for i, text in enumerate(texts):
            if out[i] is None:
                out[i] = self._tokenize_long(text)
        return out  # type: ignore[return-value]

    def _tokenize_long(self, text: str) -> Tokenized:
        limit = self.prefix_chars
        while True:
            cut = safe_cut(text, limit, self.cut_mode, self.do_lower_case)
            if cut is None and limit < len(text) and self.cut_mode != "none":
                limit *= 2  # no safe cut near the limit: widen
                continue
            ids = self._encode([text if cut is None else text[:cut]])[0]
            # More tokens than allowed (truncation keeps max + 1): the whole text's result.
            if cut is None or len(ids) > self.max_seq_tokens:
                return self._finish(ids)
            limit = max(limit * 2, cut + 1)

    def _encode(self, texts: list[str]) -> list[list[int]]:
        if self.do_lower_case:
            texts = [t.lower() for t in texts]
        if len(texts) == 1 and len(texts[0]) < GIL_FREE_MIN_CHARS:
            return [self._fast.encode(texts[0]).ids]
        return [e.ids for e in self._fast.encode_batch(texts)]

    def _finish(self, ids: list[int]) -> Tokenized:
        if len(ids) > self.max_seq_tokens:
            tail = [self.end_id] if self.end_id is not None and ids[-1] == self.end_id else []
            kept = ids[: self.max_seq_tokens - len(tail)] + tail
            return Tokenized(tuple(kept), truncated=True)
        return Tokenized(tuple(ids), truncated=False)
