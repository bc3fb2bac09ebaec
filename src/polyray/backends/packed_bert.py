"""An unpadded ("packed") forward pass for BERT-family encoders, built from the loaded HF weights.

Why: a server's batches mix lengths, and a padded forward pass computes every padded position.
Here the dense layers (≈ 95 % of MiniLM's FLOPs at these lengths: QKV, attention output, the
feed-forward pair) run once over the concatenated real tokens of the whole batch, so padding costs
nothing there, and large batches keep the matrix products efficient. Only attention needs
per-sequence structure: sequences are sorted by length and cut into buckets of similar length
(``plan_groups``), each bucket padded to its own longest sequence and masked. The math is the
model's own (same weights, same ops, same order of layer norms), so outputs equal the padded
forward pass to float rounding; ``supports`` says which configurations qualify, and the torch
backend falls back to the plain Hugging Face forward for anything else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from polyray.policies import BatchPolicy, plan_groups

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}
# Attention buckets: one more bucket costs a few small ops (≈ 16 token-equivalents); padding
# inside a bucket costs attention work only, which is cheap at these lengths.
_BUCKET_POLICY = BatchPolicy(budget_tokens=1 << 30, max_batch_size=1 << 30, overhead_tokens=16)


def supports(model: Any) -> bool:
    config = model.config
    return (
        config.model_type == "bert"
        and getattr(config, "position_embedding_type", "absolute") == "absolute"
        and config.hidden_act in _ACTIVATIONS
        and not getattr(config, "is_decoder", False)
    )


# (first token, sequences, longest, gather index into padded rows or None, validity mask or None)
Bucket = tuple[int, int, int, torch.Tensor | None, torch.Tensor | None]


@dataclass(frozen=True)
class _Layer:
    w_qkv: torch.Tensor  # (hidden, 3 * hidden), transposed for addmm
    b_qkv: torch.Tensor
    w_out: torch.Tensor
    b_out: torch.Tensor
    ln1: tuple[torch.Tensor, torch.Tensor]
    w_in: torch.Tensor
    b_in: torch.Tensor
    w_ffn_out: torch.Tensor
    b_ffn_out: torch.Tensor
    ln2: tuple[torch.Tensor, torch.Tensor]


def _t(linear: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight transposed for ``addmm``, bias) of an ``nn.Linear`` or the backend's ``TransposedLinear``."""
    weight_t = linear.weight_t if hasattr(linear, "weight_t") else linear.weight.t()
    return weight_t.detach().contiguous(), linear.bias.detach().contiguous()


class PackedBertEncoder:
    """Call with token-id sequences; returns (hidden states ``T × H`` in input order, lengths)."""

    def __init__(self, model: Any) -> None:
        if not supports(model):
            raise ValueError("packed execution supports BERT encoders with absolute positions only")
        config = model.config
        self.hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.hidden // self.num_heads
        self.eps = config.layer_norm_eps
        self.act = _ACTIVATIONS[config.hidden_act]
        emb = model.embeddings
        self.word = emb.word_embeddings.weight.detach()
        self.position = emb.position_embeddings.weight.detach()
        self.token_type0 = emb.token_type_embeddings.weight.detach()[0]
        self.emb_ln = (emb.LayerNorm.weight.detach(), emb.LayerNorm.bias.detach())
        self.layers = []
        for layer in model.encoder.layer:
            att = layer.attention.self
            q, k, v = _t(att.query), _t(att.key), _t(att.value)
            w_out, b_out = _t(layer.attention.output.dense)
            w_in, b_in = _t(layer.intermediate.dense)
            w_ffn_out, b_ffn_out = _t(layer.output.dense)
            self.layers.append(
                _Layer(
                    torch.cat([q[0], k[0], v[0]], dim=1).contiguous(),
                    torch.cat([q[1], k[1], v[1]]),
                    w_out,
                    b_out,
                    (layer.attention.output.LayerNorm.weight.detach(), layer.attention.output.LayerNorm.bias.detach()),
                    w_in,
                    b_in,
                    w_ffn_out,
                    b_ffn_out,
                    (layer.output.LayerNorm.weight.detach(), layer.output.LayerNorm.bias.detach()),
                )
            )

    def __call__(self, batch: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        # Work in length-sorted order so every attention bucket is a contiguous slice of tokens.
        order = sorted(range(len(batch)), key=lambda i: len(batch[i]))
        lengths = [len(batch[i]) for i in order]
        ids = torch.tensor([t for i in order for t in batch[i]], dtype=torch.long)
        positions = torch.cat([torch.arange(n) for n in lengths])
        buckets = self._buckets(lengths)
        h = self.word.index_select(0, ids) + self.position.index_select(0, positions) + self.token_type0
        h = F.layer_norm(h, (self.hidden,), *self.emb_ln, self.eps)
        for layer in self.layers:
            qkv = torch.addmm(layer.b_qkv, h, layer.w_qkv)
            ctx = (
                torch.cat([self._attend(qkv, bucket) for bucket in buckets])
                if len(buckets) > 1
                else self._attend(qkv, buckets[0])
            )
            h = F.layer_norm(torch.addmm(layer.b_out, ctx, layer.w_out) + h, (self.hidden,), *layer.ln1, self.eps)
            inner = self.act(torch.addmm(layer.b_in, h, layer.w_in))
            h = F.layer_norm(
                torch.addmm(layer.b_ffn_out, inner, layer.w_ffn_out) + h, (self.hidden,), *layer.ln2, self.eps
            )
        # Back to input order.
        sorted_lengths = torch.tensor(lengths)
        starts = torch.cumsum(sorted_lengths, 0) - sorted_lengths
        inverse = [0] * len(order)
        for pos, i in enumerate(order):
            inverse[i] = pos
        token_order = torch.cat([torch.arange(int(starts[p]), int(starts[p]) + lengths[p]) for p in inverse])
        return h.index_select(0, token_order), torch.tensor([len(s) for s in batch])

    def _buckets(self, lengths: list[int]) -> list[Bucket]:
        """Per bucket: (first token, sequences, longest, gather index into padded rows, mask)."""
        out: list[Bucket] = []
        token_start = 0
        for start, end in plan_groups(lengths, _BUCKET_POLICY):
            group = lengths[start:end]
            longest = group[-1]
            num_tokens = sum(group)
            if all(n == longest for n in group):
                out.append((token_start, end - start, longest, None, None))
            else:
                lens = torch.tensor(group)
                valid = torch.arange(longest)[None, :] < lens[:, None]  # (seqs, longest)
                seq_starts = torch.cumsum(lens, 0) - lens
                # Padded slot (s, p) reads token seq_starts[s] + p, clamped into the bucket; the
                # mask hides the clamped keys, and padded query rows are never read back.
                gather = (seq_starts[:, None] + torch.arange(longest)[None, :]).clamp(max=num_tokens - 1)
                out.append((token_start, end - start, longest, gather.reshape(-1) + token_start, valid))
            token_start += num_tokens
        return out

    def _attend(self, qkv: torch.Tensor, bucket: Bucket) -> torch.Tensor:
        token_start, num_seqs, longest, gather, valid = bucket
        heads, dim = self.num_heads, self.head_dim
        if gather is None:
            rows = qkv[token_start : token_start + num_seqs * longest]
            q, k, v = rows.view(num_seqs, longest, 3, heads, dim).permute(2, 0, 3, 1, 4)
            ctx = F.scaled_dot_product_attention(q, k, v)
            return ctx.transpose(1, 2).reshape(num_seqs * longest, self.hidden)
        assert valid is not None
        rows = qkv.index_select(0, gather)
        q, k, v = rows.view(num_seqs, longest, 3, heads, dim).permute(2, 0, 3, 1, 4)
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])
        return ctx.transpose(1, 2).reshape(num_seqs * longest, self.hidden)[valid.reshape(-1)]


def pool_packed(hidden: torch.Tensor, lengths: torch.Tensor, mode: str) -> torch.Tensor:
    """sentence-transformers' pooling over packed hidden states (``T × H``, sequences back to back)."""
    starts = torch.cumsum(lengths, 0) - lengths
    if mode == "cls":
        return hidden.index_select(0, starts)
    segment = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    if mode == "max":
        out = torch.full((len(lengths), hidden.shape[1]), float("-inf"), dtype=hidden.dtype)
        return out.scatter_reduce(0, segment[:, None].expand_as(hidden), hidden, reduce="amax")
    summed = torch.zeros((len(lengths), hidden.shape[1]), dtype=hidden.dtype).index_add_(0, segment, hidden)
    counts = lengths.to(hidden.dtype)[:, None]
    if mode == "mean":
        return summed / counts
    if mode == "mean_sqrt_len":
        return summed / counts.sqrt()
    raise ValueError(f"unknown pooling mode {mode!r}")
