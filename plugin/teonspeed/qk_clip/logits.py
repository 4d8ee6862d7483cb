"""The largest pre-softmax logit of each attention head, computed a chunk of query rows at a time so that
no more than `chunk_elements` logits exist at once (attention kernels such as SDPA never materialise
QKᵀ; the clip must not make them). Pure tensor functions; the result stays on the device (fp32).

Masks follow the attention they mirror, broadcastable to [b, heads, sq, sk]: `allowed` is a boolean mask
(True = the position takes part: torch's SDPA) or an additive float mask (0 / very negative: Hugging Face
eager), `blocked` a boolean mask of the positions left out (Megatron's convention); `causal` leaves out key
j > query i (top-left aligned, as torch's SDPA and Megatron's causal softmax do).
"""

from __future__ import annotations

from typing import Optional

import torch

CHUNK_ELEMENTS = 1 << 22
"""Logits materialised at once: 4 Mi elements (16 MiB in fp32), whatever the sequence length."""


def _rows_per_chunk(other_elements: int, num_rows: int, chunk_elements: int) -> int:
    return max(1, min(num_rows, chunk_elements // max(1, other_elements)))


def _window(mask: torch.Tensor, rows: slice, keys: int) -> torch.Tensor:
    """The mask's entries for query rows `rows` and the first `keys` keys (broadcast dims kept)."""
    if mask.dim() >= 2 and mask.size(-2) > 1:
        mask = mask[..., rows, :]
    return mask[..., :keys] if mask.size(-1) > 1 else mask


def _mask_(
    s: torch.Tensor,
    rows: slice,
    causal: bool,
    allowed: Optional[torch.Tensor],
    blocked: Optional[torch.Tensor],
) -> torch.Tensor:
    """In place on the chunk s [b, h, c, keys] (a tensor made here): the positions that do not enter the
    softmax at -inf (an additive mask added, as the attention adds it)."""
    keys = s.size(-1)
    if allowed is not None:
        m = _window(allowed, rows, keys)
        if m.dtype == torch.bool:
            s.masked_fill_(~m, float("-inf"))
        else:
            s.add_(m)
    if blocked is not None:
        s.masked_fill_(_window(blocked, rows, keys), float("-inf"))
    if causal:  # only the chunk's diagonal block has keys after some of its rows
        _causal_(s[..., rows.start : keys], rows)
    return s


def _causal_(block: torch.Tensor, rows: slice) -> None:
    """block [.., c, c'] holds keys rows.start, rows.start + 1, ... of query rows `rows`: every key after its
    query to -inf."""
    q_pos = torch.arange(rows.stop - rows.start, device=block.device).unsqueeze(1)
    k_pos = torch.arange(block.size(-1), device=block.device).unsqueeze(0)
    block.masked_fill_(k_pos > q_pos, float("-inf"))


def head_max_logits(
    query: torch.Tensor,
    key: torch.Tensor,
    scale: float,
    *,
    causal: bool,
    allowed: Optional[torch.Tensor] = None,
    blocked: Optional[torch.Tensor] = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """max over batch, query and key positions of scale · q·k, per query head: query [b, H, sq, d], key
    [b, Hk, sk, d] with H a multiple of Hk (GQA: query heads g·H/Hk ... (g+1)·H/Hk − 1 share key head g, as
    Hugging Face's repeat_kv and Megatron's repeat_interleave arrange them). Causal: a chunk of query rows
    only meets the keys up to its last row (about half the products of QKᵀ). Returns [H] fp32; a head whose
    every position is masked gets -inf."""
    b, heads, sq, d = query.shape
    kv_heads, sk = key.size(1), key.size(2)
    if heads % kv_heads:
        raise ValueError(f"teonspeed: QK-clip: {heads} query heads cannot share {kv_heads} key heads evenly")
    group = heads // kv_heads
    with torch.no_grad():
        q = query.reshape(b, kv_heads, group, sq, d)
        k_t = key.transpose(-1, -2).unsqueeze(2)  # [b, Hk, 1, d, sk]: broadcast over the group, no copy
        out = torch.full((heads,), float("-inf"), dtype=torch.float32, device=query.device)
        step = _rows_per_chunk(b * heads * sk, sq, chunk_elements)
        for start in range(0, sq, step):
            rows = slice(start, min(sq, start + step))
            keys = min(sk, rows.stop) if causal else sk
            s = torch.matmul(q[:, :, :, rows] * scale, k_t[..., :keys])
            s = s.view(b, heads, rows.stop - start, keys)
            out = torch.maximum(out, _mask_(s, rows, causal, allowed, blocked).amax(dim=(0, 2, 3)).float())
    return out


def head_max_of_scores(
    scores: torch.Tensor,
    scale: float = 1.0,
    *,
    causal: bool,
    allowed: Optional[torch.Tensor] = None,
    blocked: Optional[torch.Tensor] = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """The same maximum from logits an attention has already materialised (scores [b, H, sq, sk], to be
    multiplied by `scale` > 0, as Megatron's softmax does with its layer-scaling coefficient): no matmul.
    Causal without a mask: the keys before a chunk's first row are read in place (no copy) and only the
    diagonal block is copied and masked; with a mask, one chunk at a time is copied (fp32) and masked."""
    b, heads, sq, sk = scores.shape
    with torch.no_grad():
        out = torch.full((heads,), float("-inf"), dtype=torch.float32, device=scores.device)
        step = _rows_per_chunk(b * heads * sk, sq, chunk_elements)
        for start in range(0, sq, step):
            rows = slice(start, min(sq, start + step))
            keys = min(sk, rows.stop) if causal else sk
            if causal and allowed is None and blocked is None:
                if start > 0:  # every row of the chunk sees these keys
                    out = torch.maximum(out, scores[:, :, rows, :start].amax(dim=(0, 2, 3)).float() * scale)
                s = scores[:, :, rows, start:keys].to(torch.float32, copy=True)
                _causal_(s, rows)
                out = torch.maximum(out, s.amax(dim=(0, 2, 3)) * scale)
                continue
            s = scores[:, :, rows, :keys].to(torch.float32, copy=True)  # ours to mask in place
            if scale != 1.0:
                s.mul_(scale)
            out = torch.maximum(out, _mask_(s, rows, causal, allowed, blocked).amax(dim=(0, 2, 3)))
    return out
