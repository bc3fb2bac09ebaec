"""The tokenize stage: size-aware (small requests inline, large ones on threads), timed, checked.

Tokenizing is compute the client is charged for, so it is measured here (integer ns) and added
to the engine's measured compute; the engine charges it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from polyray.backends.base import Backend, Tokenized
from polyray.errors import InvalidRequest
from polyray.types import ModelRef

# Requests of at most this many texts and characters are tokenized on the event loop (≈ 1 ms of
# work at most: the real tokenizer runs ~1 µs per character); anything larger goes to the tokenizer
# threads so the loop stays responsive. Counting texts alone let one 4 MB text freeze the server.
INLINE_TOKENIZE_MAX_TEXTS = 8
INLINE_TOKENIZE_MAX_CHARS = 1024


def estimate_tokens(texts: Sequence[str], max_seq_tokens: int) -> int:
    """Tokens before tokenizing (about a character per token / 4), so a refusal the queue alone
    decides costs no tokenizing."""
    return sum(min(max_seq_tokens, len(text) // 4 + 2) for text in texts)


def truncated_indices(
    tokenized: Sequence[Tokenized], allow: bool, ref: ModelRef, max_seq_tokens: int
) -> tuple[int, ...]:
    """Indices of the texts cut to fit; over-long texts are refused unless the request allows cutting."""
    truncated = tuple(i for i, t in enumerate(tokenized) if t.truncated)
    if truncated and not allow:
        raise InvalidRequest(
            f"input[{truncated[0]}] is longer than model {ref}'s maximum of {max_seq_tokens} tokens "
            "(this server rejects over-long texts instead of truncating them)",
            param=f"input[{truncated[0]}]",
            code="context_length_exceeded",
        )
    return truncated


class Tokenizer:
    """Tokenizes on the event loop when a request is small, else on threads of its own: in the
    default executor it would queue behind database and fsync work (ledger, directory), which can
    take seconds on a slow disk."""

    def __init__(self, num_threads: int = 2) -> None:
        self._pool = ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="polyray-tokenize")
        self.measured_ns = 0  # Σ of every tokenization's wall time
        self.num_inline = 0  # requests tokenized on the event loop (the rest: tokenizer threads)

    async def tokenize(self, backend: Backend, texts: Sequence[str]) -> tuple[list[Tokenized], int]:
        """The texts' tokens and the nanoseconds it took (added to ``measured_ns``)."""
        started_ns = time.perf_counter_ns()
        if len(texts) <= INLINE_TOKENIZE_MAX_TEXTS and sum(map(len, texts)) <= INLINE_TOKENIZE_MAX_CHARS:
            self.num_inline += 1
            tokenized = backend.tokenize(texts)
        else:
            tokenized = await asyncio.get_running_loop().run_in_executor(self._pool, backend.tokenize, texts)
        tokenize_ns = time.perf_counter_ns() - started_ns
        self.measured_ns += tokenize_ns
        return tokenized, tokenize_ns

    def close(self) -> None:
        self._pool.shutdown(wait=False)
