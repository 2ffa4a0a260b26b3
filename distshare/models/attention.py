"""A tiny transformer classifier whose attention weights can be pointed at by name.

The seed's claim "one W_Q, W_K, W_V serves every sample" needs named tensors to point at,
so every layer holds explicit `W_Q`, `W_K`, `W_V`, `W_O` linear maps (parameter names like
`layers.0.attn.W_Q.weight`) and attention is written out by hand, which also hands back the
attention maps. There is no dropout: the toolkit compares runs bit for bit, and dropout would
make every forward depend on the RNG.

Padding is masked exactly: a padding key gets weight exactly 0 and pooling skips padding, so a
sample's logits depend neither on how far it is padded nor on the other samples of its batch
(beyond rounding in the matrix products). Without positional encoding the model is a bag of
tokens: exactly permutation invariant for the sequence task.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from distshare.data.types import DataInfo

ATTENTION = ("softmax", "uniform", "self")  # what mixes the tokens: attention proper, or an ablation


def sinusoidal_positions(length: int, d_model: int) -> Tensor:
    """The fixed encoding of "Attention is all you need": sin on even, cos on odd features."""
    pos = torch.arange(length, dtype=torch.float64)[:, None]
    freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(10000.0) / d_model))
    pe = torch.zeros(length, d_model, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)[:, : d_model // 2]  # odd d_model: one cos column fewer
    return pe.to(torch.get_default_dtype())


class SelfAttention(nn.Module):
    """Multi-head self-attention, softmax(Q K^T / sqrt(d_head)) V, with the maps returned."""

    def __init__(self, d_model: int, n_heads: int, attention: str = "softmax") -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        if attention not in ATTENTION:
            raise ValueError(f"unknown attention {attention!r}; expected one of {', '.join(ATTENTION)}")
        self.n_heads, self.d_head, self.attention = n_heads, d_model // n_heads, attention
        self.W_Q = nn.Linear(d_model, d_model, bias=False)
        self.W_K = nn.Linear(d_model, d_model, bias=False)
        self.W_V = nn.Linear(d_model, d_model, bias=False)
        self.W_O = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: Tensor, pad_mask: Tensor) -> tuple[Tensor, Tensor]:
        b, t, d = x.shape

        def heads(y: Tensor) -> Tensor:  # [B, T, D] -> [B, H, T, D/H]
            return y.view(b, t, self.n_heads, self.d_head).transpose(1, 2)

        q, k, v = heads(self.W_Q(x)), heads(self.W_K(x)), heads(self.W_V(x))
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.d_head)
        # The most negative finite number rather than -inf: exp() of it minus any real score is
        # exactly 0, so padding keys get weight 0; and a row with no real key at all (an all-padding
        # sample) becomes uniform instead of 0/0 = NaN, which would poison the whole batch's gradient.
        scores = scores.masked_fill(~pad_mask[:, None, None, :], torch.finfo(scores.dtype).min)
        attn = scores.softmax(dim=-1) if self.attention == "softmax" else self._ablated(scores, pad_mask)
        out = (attn @ v).transpose(1, 2).reshape(b, t, d)
        return self.W_O(out), attn

    def _ablated(self, scores: Tensor, pad_mask: Tensor) -> Tensor:
        """The maps of an ablation, shaped like the scores they ignore: [B, H, T, T]."""
        t = scores.shape[-1]
        if self.attention == "self":
            return torch.eye(t, dtype=scores.dtype, device=scores.device).expand_as(scores)
        real = pad_mask[:, None, None, :].to(scores.dtype)  # uniform over the real keys
        return (real / real.sum(-1, keepdim=True).clamp(min=1)).expand_as(scores)


class Block(nn.Module):
    """Pre-LayerNorm block: x + attn(LN(x)), then x + ff(LN(x))."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, attention: str = "softmax") -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads, attention)
        self.ln2 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))

    def forward(self, x: Tensor, pad_mask: Tensor) -> tuple[Tensor, Tensor]:
        h, attn = self.attn(self.ln1(x), pad_mask)
        x = x + h
        return x + self.ff(self.ln2(x)), attn


class TinyTransformer(nn.Module):
    """Token classifier ("token" task) or sentence classifier ("sequence" task, mean-pooled)."""

    def __init__(
        self,
        info: DataInfo,
        d_model: int = 32,
        n_heads: int = 4,
        n_layers: int = 2,
        d_ff: int = 64,
        positional: bool = True,
        attention: str = "softmax",
    ) -> None:
        super().__init__()
        if info.task not in ("sequence", "token"):
            raise ValueError(f"unknown task {info.task!r}; expected 'sequence' or 'token'")
        self.task, self.positional = info.task, positional
        self.embed = nn.Embedding(info.vocab_size, d_model, padding_idx=0)
        # A buffer, not a parameter: positions are fixed, never trained, and not saved (they are
        # recomputed from the shape), yet they follow the model through .to(dtype/device).
        self.register_buffer("pe", sinusoidal_positions(max(info.max_len, 1), d_model), persistent=False)
        self.layers = nn.ModuleList(Block(d_model, n_heads, d_ff, attention) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, info.num_classes)

    def encode(self, input_ids: Tensor, pad_mask: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        """Final per-token representations [B, T, d_model] and per-layer maps [B, n_heads, T, T].

        `pad_mask` is True at real tokens; by default every id other than 0 (`<pad>`) is real.
        """
        if pad_mask is None:
            pad_mask = input_ids != 0
        x = self.embed(input_ids)
        if self.positional:
            t = input_ids.shape[1]
            if t > self.pe.shape[0]:
                raise ValueError(f"sequence of length {t} exceeds max_len={self.pe.shape[0]} of this model")
            x = x + self.pe[:t]
        maps = []
        for layer in self.layers:
            x, attn = layer(x, pad_mask)
            maps.append(attn)
        return self.ln_f(x), maps

    def forward(
        self, input_ids: Tensor, pad_mask: Tensor | None = None, return_attention: bool = False
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Logits [B, num_classes] (sequence) or [B, T, num_classes] (token); maps on request."""
        if pad_mask is None:
            pad_mask = input_ids != 0
        h, maps = self.encode(input_ids, pad_mask)
        if self.task == "sequence":
            real = pad_mask[..., None]
            # masked_fill, not multiply: padding rows must add exactly 0 whatever they hold. The
            # count is clamped so that an all-padding sample pools to 0 instead of 0/0.
            summed = h.masked_fill(~real, 0.0).sum(dim=1)
            h = summed / real.sum(dim=1).clamp(min=1).to(h.dtype)
        logits = self.head(h)
        return (logits, maps) if return_attention else logits


def set_attention(model: TinyTransformer, attention: str) -> TinyTransformer:
    """Switch what mixes the tokens in every layer of `model` (in place; parameters untouched)."""
    if attention not in ATTENTION:
        raise ValueError(f"unknown attention {attention!r}; expected one of {', '.join(ATTENTION)}")
    for layer in model.layers:
        layer.attn.attention = attention
    return model
