"""The Triton backend: fused kernels with the names, signatures and semantics of ``fastenc.reference``.

``fastenc.kernels`` is a drop-in ops module: the encoder calls ``ops.linear(...)`` etc. on whichever of
``fastenc.reference`` or ``fastenc.kernels`` was chosen at load. Importing it needs ``triton`` but no
GPU; on the CPU the launchers run only under the Triton interpreter (``TRITON_INTERPRET=1`` set before
``triton`` is first imported) and raise ``fastenc.errors.BackendError`` otherwise.

Block configs are fixed per GPU architecture (``_target``); ``python -m fastenc.kernels.aot`` compiles
every kernel for any architecture without a GPU and reports shared memory, registers, spills and the
tensor-core instructions of each (``aot``).

Under the interpreter, importing this package installs ``interpreter``'s exact, position-independent
``tl.dot`` and round-to-nearest bf16 casts (Triton's own are the host's BLAS, whose result for a row
depends on its place in the tile, and integer arithmetic on bf16 bits), so that every process running
these kernels on the CPU (the tests, a server the tests start, the GPU check's dry run) computes the
same bits.
"""

from fastenc.kernels import _target
from fastenc.kernels.attention import attention
from fastenc.kernels.embeddings import embeddings
from fastenc.kernels.gemm import gated_linear, gated_linear_fp8, linear, linear_fp8
from fastenc.kernels.layer_norm import add_layer_norm, add_layer_norm_fp8, gelu_layer_norm, layer_norm, layer_norm_fp8
from fastenc.kernels.maxsim import maxsim
from fastenc.kernels.qkv import fused_qkv, fused_qkv_fp8
from fastenc.kernels.rms_norm import rms_norm, sandwich_rms_norm
from fastenc.kernels.splade import splade_pool

KERNELS = (
    ("embeddings", "word + position (+ type) gather, sum and LayerNorm in one pass, one token per program; "
                   "a scaled gather without the norm for the decoders (Gemma's sqrt(hidden))"),
    ("linear", "tiled GEMM, fp32 accumulation, bias, activation and residual in the epilogue"),
    ("gated_linear", "the GEMM over interleaved halves, act(a) * b in the epilogue (GeGLU, SwiGLU)"),
    ("fused_qkv", "one GEMM for Q, K, V stored head-split as (heads + 2 * kv_heads, tokens, head_dim), Q "
                  "pre-scaled; per-head QK RMSNorm and RoPE in the epilogue"),
    ("attention", "flash attention (online softmax, exp2) over packed variable-length sequences; causal "
                  "(key blocks above the diagonal skipped), grouped-query K/V, sliding window skipping key "
                  "blocks, relative position bias, DeBERTa's c2p/p2c terms per tile"),
    ("add_layer_norm", "LayerNorm(x + residual), one row per program, fp32 statistics"),
    ("layer_norm", "LayerNorm(x), one row per program, fp32 statistics"),
    ("gelu_layer_norm", "LayerNorm(act(x)), one row per program, fp32 statistics"),
    ("rms_norm", "RMSNorm(x) with (offset + weight), transformers' roundings, one row per program"),
    ("sandwich_rms_norm", "residual + RMSNorm(x), then RMSNorm of that: Gemma's post-norm, residual add and "
                          "next pre-norm in one pass"),
    ("splade_pool", "SPLADE head: vocabulary GEMM tiles, log1p-ReLU and per-text max/sum pooling in registers; "
                    "the (tokens, vocab) logits never reach memory"),
    ("linear_fp8", "the GEMM on e4m3 operands (fp32 accumulation promoted every 128 products), the token and "
                   "channel scales with the bias, activation and residual in the epilogue; a 16-bit x is "
                   "quantized per token in the prologue"),
    ("gated_linear_fp8", "gated_linear on e4m3 operands, scales in the epilogue"),
    ("fused_qkv_fp8", "fused_qkv on e4m3 operands, scales in the epilogue"),
    ("add_layer_norm_fp8", "add_layer_norm that also writes its output as e4m3 codes and one fp32 scale per token"),
    ("layer_norm_fp8", "layer_norm that also writes its output as e4m3 codes and one fp32 scale per token"),
    ("maxsim", "late-interaction (ColBERT MaxSim) scores of a query against packed documents: dot-product tiles, "
               "a running max per (document token, query token) lane in registers, the sum over the query; the "
               "(query tokens, document tokens) products never reach memory"),
)

if _target.INTERPRETED:
    from fastenc.kernels import interpreter as _interpreter

    _interpreter.install()

__all__ = ["KERNELS", "add_layer_norm", "add_layer_norm_fp8", "attention", "embeddings", "fused_qkv", "fused_qkv_fp8",
           "gated_linear", "gated_linear_fp8", "gelu_layer_norm", "layer_norm", "layer_norm_fp8", "linear", "linear_fp8",
           "maxsim", "rms_norm", "sandwich_rms_norm", "splade_pool"]
