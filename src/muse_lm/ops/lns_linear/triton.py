"""`lns_linear` in Triton: uint8 LNS code tiles decoded in registers, multiplied on tensor cores.

One kernel computes out[M, P] = a[M, Q] @ B[Q, P] where B is the decoded weight:
- forward (TRANS_W): a = x [M, K], codes [N, K], B[k, n] = unit(codes[n, k]); the per-row scale s[n]
  multiplies output column n in the epilogue, then the bias is added (fp32 accumulator).
- dx (not TRANS_W): a = grad [M, N], B[n, k] = s[n] * unit(codes[n, k]) = decode(W)[n, k]; here the
  scale sits on the contraction dim, so it is applied while decoding.

Decoding a code byte c (see `reference.py`): m = c & 127; u = 2^(m/8 - 15.875) on the SFU (exp2 of
fp32; exact to the tensor-core dtype's rounding: every 2^(f/8) sits >= 0.08 ulp away from a bf16
rounding tie); the sign bit is OR-ed into u's sign bit; m = 0 gives 0. m -> float is a bit trick
(2^23 + m as float bits, minus 2^23 folded into the exp2 argument's constant) instead of an I2F.
The decoded tile is rounded to a's dtype (bf16 / fp16: tensor cores; fp32: ieee dots) and fed to
`tl.dot` with an fp32 accumulator. Padding codes load as 0, which decodes to an exact zero.

Cost model: every W element is decoded once per M tile, so the decode work per multiply-add is
~1/BM; large BM tiles (128-256) keep the ~10 ALU ops + 1 SFU op per decoded element below the
tensor-core time of the same tile, and the pipeliner overlaps the two.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from muse_lm.ops._config import check_at_least_one, check_tiles, check_warps
from muse_lm.ops._dispatch import compile_boundary, interpreter_enabled

__all__ = [
    "CONFIGS",
    "FP32_CONFIGS",
    "LNSLinearConfig",
    "DECODE_GEMM_MIN_ROWS",
    "LNSLinearTriton",
    "configs_for",
    "decode_weight",
    "lns_linear_triton",
    "lns_matmul_dx",
    "lns_matmul_forward",
    "usable_configs",
]


@dataclass(frozen=True)
class LNSLinearConfig:
    """Tile shape: BM rows x BN output columns per program, BK of the contraction per step, warps,
    pipeline stages, and GROUP_M (row tiles that share a column tile in the launch order, for L2)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8

    def __post_init__(self):
        check_tiles(self, "block_m", "block_n", "block_k", minimum=16, why="tl.dot tiles")
        check_warps(self, (1, 2, 4, 8, 16))
        check_at_least_one(self, "num_stages", "group_m")

    def smem_bytes(self, elem_bytes: int) -> int:
        """Shared-memory estimate: `num_stages` buffers of the a tile and the uint8 code tile, plus one
        decoded tile staged for the tensor cores (and the epilogue's reuse of the same memory)."""
        per_stage = self.block_m * self.block_k * elem_bytes + self.block_k * self.block_n
        return self.num_stages * per_stage + self.block_k * self.block_n * elem_bytes


# Declared once: the autotuner's search space on CUDA (pruned to the device's shared memory) and
# the list every test runs. Estimates at bf16 (fp32 a tiles double the first term):
CONFIGS = (
    LNSLinearConfig(128, 256, 64, 8, 3),  # 128 KiB: large tiles, decode amortized over 128 rows
    LNSLinearConfig(256, 128, 64, 8, 3),  # 136 KiB: decode amortized over 256 rows
    LNSLinearConfig(128, 128, 64, 8, 4),  # 112 KiB
    LNSLinearConfig(128, 128, 64, 4, 3),  # 88 KiB: fits a 99 KB card
    LNSLinearConfig(128, 128, 32, 4, 4),  # 56 KiB
    LNSLinearConfig(64, 128, 64, 4, 3),  # 64 KiB: fewer rows (short prompts)
    LNSLinearConfig(16, 64, 128, 4, 3, group_m=1),  # 52 KiB: a few rows (decode steps)
)
# fp32 inputs (generation keeps fp32 weights) get exact fp32 dots, which sm_90 has no tensor-core
# instruction for: Triton lowers them to FMAs, and CONFIGS' large tiles then spill to a 10-22 KB
# stack per thread (offline ptxas for sm_90: benchmarks/ptxas_decode_kernels.py). The driver sizes
# the context's local memory for the largest frame launched, for every resident thread (132 SMs x
# 2048), and keeps it: the autotuner's trial of 128 x 128 x 64 alone left 5.2 GiB held outside the
# allocator on an H100 (benchmarks/probe_inference_memory.py). These small tiles compile with no
# stack at all (190-210 registers).
FP32_CONFIGS = (
    LNSLinearConfig(16, 64, 32, 4, 3, group_m=1),
    LNSLinearConfig(16, 128, 32, 4, 3, group_m=1),
    LNSLinearConfig(32, 64, 32, 4, 3, group_m=1),
    LNSLinearConfig(32, 128, 32, 8, 3, group_m=1),
    LNSLinearConfig(16, 64, 64, 8, 3, group_m=1),
)


def configs_for(dtype: torch.dtype) -> tuple[LNSLinearConfig, ...]:
    """The autotuner's search space for inputs of `dtype`: FP32_CONFIGS for fp32, else CONFIGS."""
    return FP32_CONFIGS if dtype == torch.float32 else CONFIGS


@functools.cache
def _max_shared_mem(device_index: int) -> int:
    props = triton.runtime.driver.active.utils.get_device_properties(device_index)
    return int(props["max_shared_mem"])


def usable_configs(device: torch.device, elem_bytes: int = 2) -> tuple[LNSLinearConfig, ...]:
    """The configs autotuned for inputs of `elem_bytes` (4: FP32_CONFIGS, else CONFIGS) whose
    shared-memory estimate fits `device` (all of them off CUDA / in the interpreter)."""
    declared = FP32_CONFIGS if elem_bytes == 4 else CONFIGS
    if device.type != "cuda":
        return declared
    limit = _max_shared_mem(device.index if device.index is not None else torch.cuda.current_device())
    return tuple(c for c in declared if c.smem_bytes(elem_bytes) <= limit)


def _prune_configs(configs, named_args, **kwargs):
    """Drops configs over this device's shared memory (e.g. 99 KB on sm_86/89, 227 KB on H100)."""
    a = named_args["a_ptr"]
    limit = _max_shared_mem(a.device.index if a.device.index is not None else torch.cuda.current_device())
    elem = a.element_size()

    def need(cfg):
        return LNSLinearConfig(cfg.kwargs["BM"], cfg.kwargs["BN"], cfg.kwargs["BK"], cfg.num_warps,
                               cfg.num_stages).smem_bytes(elem)

    fit = [c for c in configs if need(c) <= limit]
    return fit or [min(configs, key=need)]


def _triton_configs(configs: tuple[LNSLinearConfig, ...]) -> list[triton.Config]:
    return [triton.Config({"BM": c.block_m, "BN": c.block_n, "BK": c.block_k, "GROUP_M": c.group_m},
                          num_warps=c.num_warps, num_stages=c.num_stages) for c in configs]


@triton.jit
def _decode_unit(c):
    """uint8 codes -> fp32 (-1)^sign * 2^((c & 127) / 8 - 15.875), 0 where c & 127 == 0."""
    ci = c.to(tl.uint32)
    m = ci & 127
    # (2^23 + m) as fp32 bits is exactly 2^23 + m; * 1/8 - (2^20 + 15.875) = m/8 - 15.875 exactly.
    big = (m | 0x4B000000).to(tl.float32, bitcast=True)
    u = tl.exp2(big * 0.125 - 1048591.875)
    signed = (u.to(tl.uint32, bitcast=True) | ((ci & 128) << 24)).to(tl.float32, bitcast=True)
    return tl.where(m == 0, 0.0, signed)


@triton.jit
def _k_step(a_ptrs, c_ptrs, s_ptr, acc, k0, Q, P, o_k, m_m, m_p, TRANS_W: tl.constexpr, DOT_F32: tl.constexpr,
            BK: tl.constexpr):
    """acc + a[:, k0:k0+BK] @ B[k0:k0+BK, :] (pointers are those of k0 = 0)."""
    m_k = (k0 + o_k) < Q
    a = tl.load(a_ptrs + k0, mask=m_m[:, None] & m_k[None, :], other=0.0)
    if TRANS_W:
        codes = tl.load(c_ptrs + k0, mask=m_k[:, None] & m_p[None, :], other=0)
    else:
        codes = tl.load(c_ptrs + k0 * P, mask=m_k[:, None] & m_p[None, :], other=0)
    w = _decode_unit(codes)
    if not TRANS_W:
        # dx: the scale of weight row q multiplies B's row q (the contraction dim).
        w = w * tl.load(s_ptr + k0 + o_k, mask=m_k, other=0.0)[:, None]
    if DOT_F32:
        return tl.dot(a.to(tl.float32), w, acc, input_precision="ieee")
    return tl.dot(a, w.to(a.dtype), acc)


@triton.jit
def _lns_mm_kernel(
    a_ptr, c_ptr, s_ptr, bias_ptr, out_ptr, M, P, Q, stride_am, stride_om,
    TRANS_W: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, INTERPRET: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out [M, P] = a [M, Q] @ B [Q, P] (+ epilogue), B decoded from codes (see the module docstring).

    a rows have stride stride_am (unit column stride); codes are contiguous: [P, Q] when TRANS_W,
    else [Q, P]; s [P] (TRANS_W: epilogue) or [Q] (else: in the decode); bias [P]; out rows stride_om.
    """
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BM)
    n_p = tl.cdiv(P, BN)
    # Grouped order: GROUP_M row tiles walk the column tiles together, so code tiles stay in L2.
    width = GROUP_M * n_p
    group = pid // width
    first_m = group * GROUP_M
    group_size = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_size
    pid_p = (pid % width) // group_size

    o_m = pid_m * BM + tl.arange(0, BM)
    o_p = pid_p * BN + tl.arange(0, BN)
    o_k = tl.arange(0, BK)
    m_m = o_m < M
    m_p = o_p < P
    a_ptrs = a_ptr + o_m.to(tl.int64)[:, None] * stride_am + o_k[None, :]
    if TRANS_W:
        c_ptrs = c_ptr + o_p.to(tl.int64)[None, :] * Q + o_k[:, None]
    else:
        c_ptrs = c_ptr + o_k.to(tl.int64)[:, None] * P + o_p[None, :]
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    if INTERPRET:  # Triton 3.6's interpreter cannot take a runtime bound in range() under NumPy 2
        k0 = 0
        while k0 < Q:
            acc = _k_step(a_ptrs, c_ptrs, s_ptr, acc, k0, Q, P, o_k, m_m, m_p, TRANS_W, DOT_F32, BK)
            k0 += BK
    else:
        for k0 in range(0, Q, BK):
            acc = _k_step(a_ptrs, c_ptrs, s_ptr, acc, k0, Q, P, o_k, m_m, m_p, TRANS_W, DOT_F32, BK)
    if TRANS_W:
        acc = acc * tl.load(s_ptr + o_p, mask=m_p, other=0.0)[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + o_p, mask=m_p, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + o_m.to(tl.int64)[:, None] * stride_om + o_p[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_m[:, None] & m_p[None, :])


# Tuned once per (M, P, Q) and direction; the dtype of the tensors is part of Triton's key too.
# fp32 inputs have their own search space (FP32_CONFIGS: tiles that do not spill).
_lns_mm_tuned = triton.autotune(configs=_triton_configs(CONFIGS), key=["M", "P", "Q", "TRANS_W"],
                                prune_configs_by={"early_config_prune": _prune_configs})(_lns_mm_kernel)
_lns_mm_tuned_fp32 = triton.autotune(configs=_triton_configs(FP32_CONFIGS), key=["M", "P", "Q", "TRANS_W"],
                                     prune_configs_by={"early_config_prune": _prune_configs})(_lns_mm_kernel)

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _launch(a: Tensor, codes: Tensor, scale: Tensor, bias: Tensor | None, out: Tensor, trans_w: bool,
            config: LNSLinearConfig | None) -> None:
    m_rows, q = a.shape
    p = out.shape[1]
    if out.numel() == 0:
        return
    if q == 0:
        out.copy_(bias.to(out.dtype).expand_as(out) if bias is not None else torch.zeros_like(out))
        return
    args = (a, codes, scale, bias if bias is not None else scale, out, m_rows, p, q, a.stride(0), out.stride(0))
    flags = dict(TRANS_W=trans_w, HAS_BIAS=bias is not None, DOT_F32=a.dtype == torch.float32,
                 INTERPRET=interpreter_enabled())
    if config is None and not interpreter_enabled():
        tuned = _lns_mm_tuned_fp32 if a.dtype == torch.float32 else _lns_mm_tuned
        tuned[lambda meta: (triton.cdiv(m_rows, meta["BM"]) * triton.cdiv(p, meta["BN"]),)](*args, **flags)
        return
    cfg = config or (FP32_CONFIGS[0] if a.dtype == torch.float32 else CONFIGS[3])
    if a.is_cuda and cfg.smem_bytes(a.element_size()) > _max_shared_mem(a.device.index or 0):
        raise ValueError(f"lns_linear: {cfg} needs ~{cfg.smem_bytes(a.element_size())} bytes of shared "
                         f"memory, more than this GPU has; pick one of usable_configs(device)")
    grid = (triton.cdiv(m_rows, cfg.block_m) * triton.cdiv(p, cfg.block_n),)
    _lns_mm_kernel[grid](*args, **flags, BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k, GROUP_M=cfg.group_m,
                         num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _check(x: Tensor, codes: Tensor, scale: Tensor) -> None:
    if x.dtype not in _DTYPES:
        raise ValueError(f"lns_linear_triton: x has dtype {x.dtype}; the kernel takes bf16, fp16 or fp32 "
                         "(fp64 runs on the torch reference: impl='torch')")
    if codes.dtype != torch.uint8 or codes.ndim != 2 or scale.shape != codes.shape[:1]:
        raise ValueError(f"lns_linear_triton: need codes [N, K] uint8 and scale [N], got codes "
                         f"{tuple(codes.shape)} {codes.dtype} and scale {tuple(scale.shape)}")


def lns_matmul_forward(x2d: Tensor, codes: Tensor, scale: Tensor, bias: Tensor | None = None,
                       config: LNSLinearConfig | None = None, *, out: Tensor | None = None) -> Tensor:
    """x [M, K] @ decode(codes [N, K], scale [N])^T + bias [N] -> [M, N] in x's dtype (no autograd).

    `out` (contiguous [M, N], x's dtype) is written in place when given (tests poison it).
    config None autotunes over `configs_for(x.dtype)` on CUDA (CONFIGS[3], or FP32_CONFIGS[0] for fp32,
    under the interpreter). An explicit config is run as given: a CONFIGS tile with fp32 inputs is correct
    but spills (see FP32_CONFIGS)."""
    _check(x2d, codes, scale)
    x2d = x2d if x2d.stride(-1) == 1 else x2d.contiguous()
    shape = (x2d.shape[0], codes.shape[0])
    if out is None:
        out = torch.empty(shape, device=x2d.device, dtype=x2d.dtype)
    elif out.shape != shape or out.dtype != x2d.dtype or not out.is_contiguous():
        raise ValueError(f"lns_matmul_forward: out must be contiguous {shape} {x2d.dtype}")
    _launch(x2d, codes.contiguous(), scale.float().contiguous(), None if bias is None else bias.contiguous(),
            out, True, config)
    return out


def lns_matmul_dx(grad2d: Tensor, codes: Tensor, scale: Tensor, config: LNSLinearConfig | None = None, *,
                  out: Tensor | None = None) -> Tensor:
    """grad [M, N] @ decode(codes [N, K], scale [N]) -> dx [M, K] in grad's dtype (no autograd)."""
    _check(grad2d, codes, scale)
    grad2d = grad2d if grad2d.stride(-1) == 1 else grad2d.contiguous()
    shape = (grad2d.shape[0], codes.shape[1])
    if out is None:
        out = torch.empty(shape, device=grad2d.device, dtype=grad2d.dtype)
    elif out.shape != shape or out.dtype != grad2d.dtype or not out.is_contiguous():
        raise ValueError(f"lns_matmul_dx: out must be contiguous {shape} {grad2d.dtype}")
    _launch(grad2d, codes.contiguous(), scale.float().contiguous(), None, out, False, config)
    return out


# Rows of x from which the product is compute-bound and the fused kernel's per-M-tile decode costs
# more than decoding the weight once: there one decode pass writes a transient weight in x's dtype
# (N*K*2 bytes for bf16, freed after the call) and cuBLAS multiplies. Below it (decoding, small
# batches) the fused kernel reads half of bf16's weight bytes, which is what a memory-bound product
# needs. Measured on an H100 at 16384 x 1024 -> 4096: fused 2.36x a bf16 nn.Linear, decode + cuBLAS
# ~1.05x (benchmarks/results/lns.json).
DECODE_GEMM_MIN_ROWS = 256


@triton.jit
def _decode_rows_kernel(c_ptr, s_ptr, w_ptr, K, BLOCK: tl.constexpr):
    """w[n, k] = s[n] * unit(codes[n, k]) in w's dtype: one read, one write."""
    n = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = k < K
    w = _decode_unit(tl.load(c_ptr + n * K + k, mask=mask, other=0)) * tl.load(s_ptr + n)
    tl.store(w_ptr + n * K + k, w.to(w_ptr.dtype.element_ty), mask=mask)


def decode_weight(codes: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """(codes [N, K] uint8, scale [N]) -> the decoded weight [N, K] in `dtype`, one Triton pass."""
    codes = codes.contiguous()
    n_rows, k_cols = codes.shape
    w = torch.empty(n_rows, k_cols, device=codes.device, dtype=dtype)
    if w.numel():
        block = 1024
        _decode_rows_kernel[(n_rows, triton.cdiv(k_cols, block))](
            codes, scale.float().contiguous(), w, k_cols, BLOCK=block, num_warps=4
        )
    return w


def _forward(x2d: Tensor, codes: Tensor, scale: Tensor, bias: Tensor | None, config) -> Tensor:
    if x2d.shape[0] < DECODE_GEMM_MIN_ROWS or config is not None:
        return lns_matmul_forward(x2d, codes, scale, bias, config)
    # The reference's rounding: the scaled weight rounded once to x's dtype, then one GEMM (bias fused).
    return F.linear(x2d, decode_weight(codes, scale, x2d.dtype), None if bias is None else bias.to(x2d.dtype))


def _dx(grad: Tensor, codes: Tensor, scale: Tensor, config) -> Tensor:
    if grad.shape[0] < DECODE_GEMM_MIN_ROWS or config is not None:
        return lns_matmul_dx(grad, codes, scale, config)
    return grad @ decode_weight(codes, scale, grad.dtype)


class LNSLinearTriton(torch.autograd.Function):
    """y = x @ decode(W)^T + b. Gradients: x (dx = g @ decode(W), the kernel), bias, and `latent`
    (straight-through: d latent = g^T x, as if latent were the decoded weight). Codes get none."""

    @staticmethod
    def forward(ctx, x2d, codes, scale, bias, latent, config):
        ctx.save_for_backward(x2d if latent is not None and latent.requires_grad else None, codes, scale)
        ctx.config = config
        ctx.has_bias, ctx.has_latent = bias is not None, latent is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.latent_dtype = None if latent is None else latent.dtype
        return _forward(x2d, codes, scale, bias, config)

    @staticmethod
    def backward(ctx, grad):
        x2d, codes, scale = ctx.saved_tensors
        grad = grad.contiguous()
        dx = _dx(grad, codes, scale, ctx.config) if ctx.needs_input_grad[0] else None
        db = grad.sum(0, dtype=torch.float32).to(ctx.bias_dtype) if ctx.has_bias and ctx.needs_input_grad[3] else None
        dlatent = None
        if ctx.has_latent and ctx.needs_input_grad[4]:
            dlatent = (grad.t() @ x2d).to(ctx.latent_dtype)
        return dx, None, None, db, dlatent, None


@compile_boundary
def lns_linear_triton(x: Tensor, codes: Tensor, scale: Tensor, bias: Tensor | None = None,
                      latent: Tensor | None = None, *, config: LNSLinearConfig | None = None) -> Tensor:
    """Differentiable x [..., K] -> [..., N] in x's dtype (bf16 / fp16 / fp32); same contract as
    `muse_lm.ops.lns_linear.lns_linear`, which validates and dispatches here on CUDA."""
    _check(x, codes, scale)
    x2d = x.reshape(-1, x.shape[-1])
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    y = LNSLinearTriton.apply(x2d, codes, scale, bias, latent, config)
    return y.reshape(*x.shape[:-1], codes.shape[0])
