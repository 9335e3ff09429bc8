"""Reduced-precision GEMMs: int8 (dynamic quantisation) and bf16 weights, with fused fp32 epilogues.

    packed = pack_int8(weight (N, K), bias) | pack_bf16(weight, bias)
    qgemm(x (M, K), packed, out (M, N), epilogue="none" | "gelu" | "add", columns=None)

One module per concern: kinds (which int8 / bf16 kernel this CPU runs, the VITNP_INT8_KERNEL /
VITNP_BF16_KERNEL overrides), codegen (the LLVM IR micro-kernel and its numerics), tiles (the AMX tile
micro-kernels, sharing codegen's epilogue), quantize (activation and weight number formats), pack (the
weight's panel layout), driver (tasks, the call).
"""
from .codegen import MR, NR, make_qkernel
from .driver import EPILOGUES, SERIAL_PREPARE_MAX, kernels_for, plan, prepare_a, qgemm, row_block
from .kinds import (A_DTYPE, AMX_KINDS, B_DTYPE, BF16_KIND, DESCRIPTIONS, GROUP, INT8_KIND, INT8_KINDS, K_ALIGN,
                    KIND, REASON, choose, padded_k, supported_kinds)
from .pack import PackedWeight, pack_bf16, pack_int8, pack_quantized, unpack
from .quantize import quantize_weight_rows, row_scale_zero_point

__all__ = ["MR", "NR", "make_qkernel", "EPILOGUES", "SERIAL_PREPARE_MAX", "kernels_for", "plan", "prepare_a",
           "qgemm", "row_block", "A_DTYPE", "AMX_KINDS", "B_DTYPE", "BF16_KIND", "DESCRIPTIONS", "GROUP",
           "INT8_KIND", "INT8_KINDS", "K_ALIGN", "KIND", "REASON", "choose", "padded_k", "supported_kinds",
           "PackedWeight", "pack_bf16", "pack_int8", "pack_quantized", "unpack", "quantize_weight_rows",
           "row_scale_zero_point"]
