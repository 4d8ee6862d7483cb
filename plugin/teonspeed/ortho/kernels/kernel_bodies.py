"""The bodies of the two Newton–Schulz kernels (see newton_schulz_triton.py for what they compute): plain
Python functions in Triton's language, wrapped with triton.jit on first use by `newton_schulz_triton._kernels`
(so importing them compiles nothing)."""

from __future__ import annotations

import triton.language as tl

# --------------------------------------------------------------------------------------- kernels
# Plain functions; newton_schulz_triton._kernels() wraps them with triton.jit lazily.


def _sym_kernel(
    p_ptr,
    c_ptr,
    out_ptr,
    pairs_ptr,
    M,
    K,
    s_pb,
    s_pm,
    s_pk,
    s_cb,
    s_cm,
    s_cn,
    s_ob,
    s_om,
    s_on,
    alpha,
    beta,
    HAS_C: tl.constexpr,
    MIRROR: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    RNE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    bid = tl.program_id(1).to(tl.int64)
    ti = tl.load(pairs_ptr + 2 * pid)
    tj = tl.load(pairs_ptr + 2 * pid + 1)
    rows_i = ti * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_j = tj * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    p_base = p_ptr + bid * s_pb
    mask_i = rows_i < M
    mask_j = rows_j < M
    acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        mask_k = kk < K
        lhs = tl.load(
            p_base + rows_i[:, None] * s_pm + kk[None, :] * s_pk,
            mask=mask_i[:, None] & mask_k[None, :],
            other=0.0,
        )
        rhs = tl.load(
            p_base + rows_j[None, :] * s_pm + kk[:, None] * s_pk,
            mask=mask_k[:, None] & mask_j[None, :],
            other=0.0,
        )
        if UPCAST:
            lhs = lhs.to(tl.float32)
            rhs = rhs.to(tl.float32)
        if IEEE:
            acc = tl.dot(lhs, rhs, acc, input_precision="ieee")
        else:
            acc = tl.dot(lhs, rhs, acc)
    out = acc * alpha
    if HAS_C:
        c_tile = tl.load(
            c_ptr + bid * s_cb + rows_i[:, None] * s_cm + rows_j[None, :] * s_cn,
            mask=mask_i[:, None] & mask_j[None, :],
            other=0.0,
        )
        out = out + beta * c_tile.to(tl.float32)
    if ti == tj:
        out = 0.5 * (out + tl.trans(out))
    if RNE_BF16:  # interpreter only: its fp32 -> bf16 cast truncates; round to nearest even first
        bits = out.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        out = bits.to(tl.float32, bitcast=True)
    o_base = out_ptr + bid * s_ob
    res = out.to(out_ptr.dtype.element_ty)
    tl.store(
        o_base + rows_i[:, None] * s_om + rows_j[None, :] * s_on, res, mask=mask_i[:, None] & mask_j[None, :]
    )
    if MIRROR:
        if ti != tj:
            tl.store(
                o_base + rows_j[:, None] * s_om + rows_i[None, :] * s_on,
                tl.trans(res),
                mask=mask_j[:, None] & mask_i[None, :],
            )


def _update_kernel(
    b_ptr,
    x_ptr,
    out_ptr,
    M,
    N,
    s_bb,
    s_bm,
    s_bk,
    s_xb,
    s_xm,
    s_xn,
    s_ob,
    s_om,
    s_on,
    a_coef,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    RNE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    bid = tl.program_id(1).to(tl.int64)
    num_n = tl.cdiv(N, BLOCK_N)
    pm = pid // num_n
    pn = pid % num_n
    rm = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < M
    mask_n = rn < N
    b_base = b_ptr + bid * s_bb
    x_base = x_ptr + bid * s_xb
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, M, BLOCK_K):  # B is M x M: the reduction runs over M
        kk = k0 + rk
        mask_k = kk < M
        lhs = tl.load(
            b_base + rm[:, None] * s_bm + kk[None, :] * s_bk,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        rhs = tl.load(
            x_base + kk[:, None] * s_xm + rn[None, :] * s_xn,
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        )
        if UPCAST:
            lhs = lhs.to(tl.float32)
            rhs = rhs.to(tl.float32)
        if IEEE:
            acc = tl.dot(lhs, rhs, acc, input_precision="ieee")
        else:
            acc = tl.dot(lhs, rhs, acc)
    mask = mask_m[:, None] & mask_n[None, :]
    x_tile = tl.load(x_base + rm[:, None] * s_xm + rn[None, :] * s_xn, mask=mask, other=0.0)
    out = acc + a_coef * x_tile.to(tl.float32)
    if RNE_BF16:
        bits = out.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        out = bits.to(tl.float32, bitcast=True)
    tl.store(
        out_ptr + bid * s_ob + rm[:, None] * s_om + rn[None, :] * s_on,
        out.to(out_ptr.dtype.element_ty),
        mask=mask,
    )
