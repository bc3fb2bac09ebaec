"""PyTorch CPU backend: the model's own tokenizer, transformer, pooling and normalization.

Loads any local sentence-transformers or Hugging Face directory (see ``registry.model_dir``) with
``transformers`` and never reaches a hub: every load is ``local_files_only`` (the process's
environment is left alone: nothing is set at import). The
forward pass runs under ``inference_mode`` with SDPA attention on a right-padded batch; pooling
follows the directory's Pooling module and L2 normalization its Normalize module, so the output
equals sentence-transformers' ``encode`` of the same model. For BERT encoders the default
execution is packed (``packed_bert``): no compute is spent on padding, which is what lets
cross-request batches of mixed lengths run as fast as a length-sorted offline batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging as hf_logging

from polyray.backends.base import Tokenized, pad_batch
from polyray.backends.packed_bert import PackedBertEncoder, pool_packed, supports
from polyray.backends.tokenizer import TextTokenizer
from polyray.errors import ModelLoadError
from polyray.registry.model_dir import ModelDir


class TorchBackend:
    def __init__(
        self, model_dir: ModelDir, threads: int, max_seq_tokens: int | None = None, execution: str = "auto"
    ) -> None:
        torch.set_num_threads(threads)
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call] # a progress bar per start only clutters server logs
        self.threads = threads
        self.model_dir = model_dir
        path = str(model_dir.transformer_path)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, use_fast=True)
            self.model = AutoModel.from_pretrained(path, local_files_only=True, attn_implementation="sdpa").eval()
        except Exception as exc:  # any failure to load (corrupt weights, bad config) stops start-up
            raise ModelLoadError(f"cannot load the model in {path}: {exc}") from exc
        replace_linears(self.model)
        if execution == "packed" and not supports(self.model):
            raise ModelLoadError(
                f"execution = 'packed' needs a BERT encoder; {path} is {self.model.config.model_type!r}"
            )
        self.packed = PackedBertEncoder(self.model) if execution != "padded" and supports(self.model) else None
        self.padding_free = self.packed is not None
        self.precision = "fp32"
        self.cosine_to_reference: float | None = 1.0  # this is the reference the other backends are checked against
        self.dim = model_dir.dim
        self.text_tokenizer = TextTokenizer(model_dir, max_seq_tokens, self.tokenizer)
        self.max_seq_tokens = self.text_tokenizer.max_seq_tokens
        self.pad_id = self.text_tokenizer.pad_id
        mode = "packed" if self.packed else "padded"
        self.description = f"torch {torch.__version__} cpu, {threads} threads, {mode}, {model_dir.pooling} pooling" + (
            ", normalized" if model_dir.normalize else ""
        )

    def tokenize(self, texts: Sequence[str]) -> list[Tokenized]:
        return self.text_tokenizer.tokenize(texts)

    def encode(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        if self.packed is not None:
            with torch.inference_mode():
                hidden, lengths = self.packed(batch)
                return self._finish(pool_packed(hidden, lengths, self.model_dir.pooling))
        return self.encode_padded(batch)

    def encode_padded(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        """The plain Hugging Face forward pass over a right-padded batch (the reference path)."""
        ids_np, mask_np = pad_batch(batch, self.pad_id)
        ids = torch.from_numpy(ids_np)
        mask = torch.from_numpy(mask_np)
        with torch.inference_mode():
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            return self._finish(pool(hidden, mask, self.model_dir.pooling))

    def _finish(self, pooled: torch.Tensor) -> np.ndarray:
        if self.model_dir.normalize:
            pooled = F.normalize(pooled, p=2, dim=1)
        return pooled.float().numpy()


class TransposedLinear(torch.nn.Module):
    """``nn.Linear`` with its weight stored transposed and contiguous.

    Measured on this project's CPU (torch 2.13, MKL): ``F.linear`` on few rows (one short
    sentence: 16 × 384 @ 384 × 1536) runs at ~30 GFLOP/s, ``addmm`` on a pre-transposed weight at
    ~120; from ~64 rows on they are equal. Small batches are common in a server, so every linear
    layer is swapped once at load. The arithmetic is the same, so outputs do not change.
    """

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight_t = torch.nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        bias = linear.bias.detach() if linear.bias is not None else torch.zeros(linear.out_features)
        self.bias = torch.nn.Parameter(bias.contiguous(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        return torch.addmm(self.bias, flat, self.weight_t).view(*x.shape[:-1], self.out_features)


def replace_linears(module: torch.nn.Module) -> None:
    for name, child in list(module.named_children()):
        if type(child) is torch.nn.Linear:
            setattr(module, name, TransposedLinear(child))
        else:
            replace_linears(child)


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """sentence-transformers' pooling modes over a right-padded batch."""
    if mode == "cls":
        return hidden[:, 0]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(weights == 0, -1e9).max(dim=1).values
    summed = (hidden * weights).sum(dim=1)
    counts = weights.sum(dim=1).clamp(min=1e-9)
    if mode == "mean":
        return summed / counts
    if mode == "mean_sqrt_len":
        return summed / counts.sqrt()
    raise ValueError(f"unknown pooling mode {mode!r}")
