"""The kernel suite of ``fastenc bench``: each fastenc kernel at one shape (a KernelCase) against its torch
twin in ``fastenc.reference`` and, for attention, SDPA, varlen attention and ``flash_attn``; for MaxSim, the
plain torch formula over padded documents.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .. import reference
from ..errors import BackendError
from .e2e import Shape
from .measure import attention_flops, compute_dtype, device_compare, release, time_providers
from .report import Report, _exc_line


# ====================================================================================== kernel cases
@dataclasses.dataclass
class KernelCase:
    """One kernel at one shape: inputs, the fp32 reference, the providers and the work per call.

    ``providers[name](inputs) -> (run, canonical)``: ``run()`` is timed; ``canonical(out)`` maps its output
    to the reference layout for the check. ``unit`` is ``"TFLOP/s"`` (work in FLOPs) or ``"GB/s"`` (bytes);
    ``also`` adds rows in other units beside it (MaxSim: GB/s, the unit it is bound by, and TFLOP/s).
    """

    kernel: str
    case: str  # "<kernel>:<what>:<size>", e.g. "attention:hd64:64x512", "attention-var:hd64:var64x8-512"
    batch: int
    seq: int  # the case's sequence length (the longest a variable-length case may draw)
    tokens: int  # real tokens per call
    make_inputs: Callable[[torch.device, torch.dtype], dict]
    reference: Callable[[dict], torch.Tensor]  # the torch twin, also run on float32 copies of the inputs
    providers: dict[str, Callable[[dict], tuple[Callable, Callable]]]
    work: Callable[[torch.dtype], float]
    unit: str
    baseline: str = "torch"
    also: tuple[tuple[str, Callable[[torch.dtype], float]], ...] = ()  # further (unit, work) rates reported


def _randn(shape, device, dtype, generator, scale=1.0):
    return (torch.randn(shape, generator=generator, device=device) * scale).to(dtype)


def _identity(out):
    return out


def _twin(fn: Callable[[dict], torch.Tensor]) -> Callable[[dict], tuple[Callable, Callable]]:
    return lambda inputs: (lambda: fn(inputs), _identity)


def _kernel(name: str, call: Callable[[Callable, dict], torch.Tensor]):
    """A fastenc Triton launcher (``fastenc.kernels.<name>``), imported when first used."""
    def provider(inputs):
        from .. import kernels

        launcher = getattr(kernels, name)
        return (lambda: call(launcher, inputs)), _identity

    return provider


def _lengths(batch: int, seq: int, var: bool, seed: int = 0) -> list[int]:
    return Shape(batch, seq, 8 if var and seq > 8 else None).lengths(seed) if var else [seq] * batch


def attention_case(batch: int, seq: int, var: bool, heads: int = 12, head_dim: int = 64) -> KernelCase:
    lengths = _lengths(batch, seq, var)
    tokens, width = sum(lengths), max(lengths)

    def make_inputs(device, dtype):
        generator = torch.Generator(device=device).manual_seed(0)
        qkv = _randn((3, heads, tokens, head_dim), device, dtype, generator)  # (3, H, T, D), as fused_qkv gives
        qkv[0] *= head_dim ** -0.5  # Q pre-scaled (the ops interface)
        cu = torch.zeros(batch + 1, dtype=torch.int32)
        torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0, out=cu[1:])
        return {"q": qkv[0], "k": qkv[1], "v": qkv[2], "cu": cu.to(device), "max": width}

    def ref(x):
        return reference.attention(x["q"], x["k"], x["v"], x["cu"], x["max"])

    keep = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]  # (B, S)

    def padded(x):  # (H, T, D) -> (B, H, S, D), zero padding; and the key mask for variable lengths
        device = x["q"].device
        slots = keep.reshape(-1).nonzero().squeeze(1).to(device)
        out = []
        for t in (x["q"], x["k"], x["v"]):
            p = t.new_zeros(heads, batch * width, head_dim)
            p[:, slots] = t
            out.append(p.view(heads, batch, width, head_dim).transpose(0, 1).contiguous())
        mask = None if tokens == batch * width else keep.to(device)[:, None, None, :]
        return out, mask, slots

    def sdpa(flash_only: bool):
        def provider(x):
            (q, k, v), mask, slots = padded(x)
            context = contextlib.nullcontext
            if flash_only:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                def context():
                    return sdpa_kernel([SDPBackend.FLASH_ATTENTION])

            def run():
                with context():
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)

            def canonical(out):  # (B, H, S, D) -> (T, H*D)
                return out.permute(0, 2, 1, 3).reshape(batch * width, heads * head_dim)[slots]

            return run, canonical

        return provider

    def varlen(x):  # torch's flash varlen: (T, H, D)
        from torch.nn.attention.varlen import varlen_attn

        q, k, v = (t.transpose(0, 1).contiguous() for t in (x["q"], x["k"], x["v"]))
        return (lambda: varlen_attn(q, k, v, x["cu"], x["cu"], width, width, scale=1.0),
                lambda out: out.reshape(tokens, heads * head_dim))

    def flash_attn(x):
        from flash_attn import flash_attn_varlen_func

        q, k, v = (t.transpose(0, 1).contiguous() for t in (x["q"], x["k"], x["v"]))
        return (lambda: flash_attn_varlen_func(q, k, v, x["cu"], x["cu"], width, width, softmax_scale=1.0),
                lambda out: out.reshape(tokens, heads * head_dim))

    size = Shape(batch, seq, 8 if var else None).case()
    providers = {
        "fastenc": _kernel("attention", lambda f, x: f(x["q"], x["k"], x["v"], x["cu"], x["max"])),
        "torch": _twin(ref),
        "sdpa": sdpa(False),
        "sdpa-flash": sdpa(True),
        "sdpa-varlen": varlen,
        "flash-attn": flash_attn,
    }
    return KernelCase("attention", f"attention{'-var' if var else ''}:hd{head_dim}:{size}", batch, seq, tokens,
                      make_inputs, ref, providers, lambda dtype: attention_flops(lengths, heads * head_dim), "TFLOP/s",
                      baseline="sdpa")


def fused_qkv_case(batch: int, seq: int, hidden: int = 768, heads: int = 12) -> KernelCase:
    tokens = batch * seq

    def make_inputs(device, dtype):
        g = torch.Generator(device=device).manual_seed(0)
        return {"x": _randn((tokens, hidden), device, dtype, g), "w": _randn((3 * hidden, hidden), device, dtype, g,
                                                                               hidden ** -0.5),
                "b": _randn((3 * hidden,), device, dtype, g, 0.1)}

    def ref(x):  # F.linear (addmm) + split into heads, Q scaled: the torch twin
        return torch.stack(reference.fused_qkv(x["x"], x["w"], x["b"], heads).unbind(0))

    def fastenc_provider(x):
        from .. import kernels

        return (lambda: kernels.fused_qkv(x["x"], x["w"], x["b"], heads)), (lambda out: torch.stack(tuple(out)))

    def twin(x):
        return (lambda: reference.fused_qkv(x["x"], x["w"], x["b"], heads)), (lambda out: torch.stack(tuple(out)))

    return KernelCase("fused_qkv", f"fused_qkv:h{hidden}:{batch}x{seq}", batch, seq, tokens, make_inputs, ref,
                      {"fastenc": fastenc_provider, "torch": twin},
                      lambda dtype: 2 * tokens * hidden * 3 * hidden, "TFLOP/s")


def linear_case(batch: int, seq: int, n_in: int, n_out: int, activation: str | None) -> KernelCase:
    tokens = batch * seq

    def make_inputs(device, dtype):
        g = torch.Generator(device=device).manual_seed(0)
        return {"x": _randn((tokens, n_in), device, dtype, g), "w": _randn((n_out, n_in), device, dtype, g, n_in ** -0.5),
                "b": _randn((n_out,), device, dtype, g, 0.1)}

    def ref(x):
        return reference.linear(x["x"], x["w"], x["b"], activation)

    return KernelCase("linear", f"linear:in{n_in}-out{n_out}{'-' + activation if activation else ''}:{batch}x{seq}",
                      batch, seq, tokens, make_inputs, ref,
                      {"fastenc": _kernel("linear", lambda f, x: f(x["x"], x["w"], x["b"], activation)),
                       "torch": _twin(ref)},
                      lambda dtype: 2 * tokens * n_in * n_out, "TFLOP/s")


def linear_fp8_case(batch: int, seq: int, n_in: int, n_out: int) -> KernelCase:
    """The FP8 GEMM on e4m3 operands as an FP8 encoder's LayerNorm hands them over: ``x`` quantized per token,
    the weight per output channel, both scales applied in the epilogue, float32 accumulation, the output
    rounded once to bfloat16. ``2·T·in·out`` FLOPs.

    Its peer is ``torch._scaled_mm`` with row-wise scales on the same codes (cuBLAS or CUTLASS), whose
    row-wise path writes bfloat16 on every torch version; both run without bias or activation, the bare
    GEMM whose speed the FP8 matmul peak bounds. ``inputs["out"]`` is an empty tensor of the output dtype
    (float32 in the reference's upcast copy); the e4m3 operands travel as ``(codes, scales)`` pairs, which
    the upcast leaves as they are.
    """
    tokens = batch * seq

    def make_inputs(device, dtype):
        g = torch.Generator(device=device).manual_seed(0)
        x = reference.quantize_rows(torch.randn((tokens, n_in), generator=g, device=device))
        w = reference.quantize_rows(torch.randn((n_out, n_in), generator=g, device=device) * n_in ** -0.5)
        return {"x": x, "w": w, "out": torch.empty(0, device=device, dtype=torch.bfloat16)}

    def ref(x):
        return reference.linear_fp8(*x["x"], *x["w"], None, out_dtype=x["out"].dtype)

    def scaled_mm(x):  # its second operand column-major; scales (M, 1) and (1, N)
        (xq, xs), (wq, ws) = x["x"], x["w"]
        return (lambda: torch._scaled_mm(xq, wq.t(), scale_a=xs[:, None], scale_b=ws[None, :],
                                         out_dtype=x["out"].dtype)), _identity

    return KernelCase("linear_fp8", f"linear_fp8:in{n_in}-out{n_out}:{batch}x{seq}", batch, seq, tokens,
                      make_inputs, ref,
                      {"fastenc": _kernel("linear_fp8", lambda f, x: f(*x["x"], *x["w"], None,
                                                                       out_dtype=x["out"].dtype)),
                       "torch": _twin(ref), "torch-scaled-mm": scaled_mm},
                      lambda dtype: 2 * tokens * n_in * n_out, "TFLOP/s", baseline="torch-scaled-mm")


def _norm_params(hidden, device, dtype, g):
    return {"weight": (1 + 0.1 * torch.randn(hidden, generator=g, device=device)).to(dtype),
            "bias": _randn((hidden,), device, dtype, g, 0.1), "eps": 1e-12}


def add_layer_norm_case(batch: int, seq: int, hidden: int = 768) -> KernelCase:
    tokens = batch * seq

    def make_inputs(device, dtype):
        g = torch.Generator(device=device).manual_seed(0)
        return {"x": _randn((tokens, hidden), device, dtype, g), "r": _randn((tokens, hidden), device, dtype, g),
                **_norm_params(hidden, device, dtype, g)}

    def ref(x):
        return reference.add_layer_norm(x["x"], x["r"], x["weight"], x["bias"], x["eps"])

    def work(dtype):  # read x and residual, write the output; weight and bias once
        return (3 * tokens * hidden + 2 * hidden) * dtype.itemsize

    return KernelCase("add_layer_norm", f"add_layer_norm:h{hidden}:{batch}x{seq}", batch, seq, tokens, make_inputs,
                      ref,
                      {"fastenc": _kernel("add_layer_norm",
                                          lambda f, x: f(x["x"], x["r"], x["weight"], x["bias"], x["eps"])),
                       "torch": _twin(ref)},
                      work, "GB/s")


def gelu_layer_norm_case(batch: int, seq: int, hidden: int = 768) -> KernelCase:
    tokens = batch * seq

    def make_inputs(device, dtype):
        g = torch.Generator(device=device).manual_seed(0)
        return {"x": _randn((tokens, hidden), device, dtype, g), **_norm_params(hidden, device, dtype, g)}

    def ref(x):
        return reference.gelu_layer_norm(x["x"], x["weight"], x["bias"], x["eps"], "gelu")

    def work(dtype):  # read x, write the output; weight and bias once
        return (2 * tokens * hidden + 2 * hidden) * dtype.itemsize

    return KernelCase("gelu_layer_norm", f"gelu_layer_norm:h{hidden}:{batch}x{seq}", batch, seq, tokens,
                      make_inputs, ref,
                      {"fastenc": _kernel("gelu_layer_norm",
                                          lambda f, x: f(x["x"], x["weight"], x["bias"], x["eps"], "gelu")),
                       "torch": _twin(ref)},
                      work, "GB/s")


def splade_case(batch: int, seq: int, hidden: int = 768, vocab: int = 30522) -> KernelCase:
    """The SPLADE head's fused projection, activation and max pooling over each text's tokens (``splade_pool``,
    BERT's vocabulary): ``2·T·H·V`` FLOPs, the ``(T, V)`` logits never written."""
    tokens = batch * seq

    def make_inputs(device, dtype):
        g = torch.Generator(device=device).manual_seed(0)
        cu = torch.arange(0, tokens + 1, seq, dtype=torch.int32)
        return {"x": _randn((tokens, hidden), device, dtype, g), "w": _randn((vocab, hidden), device, dtype, g,
                                                                             hidden ** -0.5),
                "b": _randn((vocab,), device, dtype, g, 0.1) - 1.0, "cu": cu.to(device)}

    def ref(x):
        return reference.splade_pool(x["x"], x["w"], x["b"], x["cu"], "max", "relu")

    return KernelCase("splade_pool", f"splade_pool:h{hidden}-v{vocab}:{batch}x{seq}", batch, seq, tokens, make_inputs,
                      ref,
                      {"fastenc": _kernel("splade_pool", lambda f, x: f(x["x"], x["w"], x["b"], x["cu"], "max",
                                                                        "relu")),
                       "torch": _twin(ref)},
                      lambda dtype: 2 * tokens * hidden * vocab, "TFLOP/s")


def embeddings_case(batch: int, seq: int, hidden: int = 768, vocab: int = 30522) -> KernelCase:
    tokens = batch * seq

    def make_inputs(device, dtype):
        g = torch.Generator(device=device).manual_seed(0)
        return {"ids": torch.randint(0, vocab, (tokens,), generator=g, device=device),
                "pos": torch.arange(seq, device=device).repeat(batch),
                "types": torch.randint(0, 2, (tokens,), generator=g, device=device),
                "word": _randn((vocab, hidden), device, dtype, g), "position": _randn((512, hidden), device, dtype, g),
                "type": _randn((2, hidden), device, dtype, g), **_norm_params(hidden, device, dtype, g)}

    def args(x):
        return (x["ids"], x["pos"], x["types"], x["word"], x["position"], x["type"], x["weight"], x["bias"], x["eps"])

    def ref(x):
        return reference.embeddings(*args(x))

    def work(dtype):  # three int64 ids and three gathered rows read per token, one row written
        return tokens * 3 * 8 + (4 * tokens * hidden + 2 * hidden) * dtype.itemsize

    return KernelCase("embeddings", f"embeddings:h{hidden}:{batch}x{seq}", batch, seq, tokens, make_inputs, ref,
                      {"fastenc": _kernel("embeddings", lambda f, x: f(*args(x))), "torch": _twin(ref)},
                      work, "GB/s")


def maxsim_case(docs: int, min_len: int, max_len: int, query_tokens: int = 32, dim: int = 128) -> KernelCase:
    """One query against ``docs`` documents of lengths drawn from ``min_len..max_len`` (seed 0), unit vectors
    as ColBERT's. GB/s: the query and the documents read once, the scores written once; TFLOP/s:
    ``2 * query_tokens * doc_tokens * dim``."""
    lengths = Shape(docs, max_len, min_len).lengths()
    tokens = sum(lengths)

    def make_inputs(device, dtype):
        g = torch.Generator(device=device).manual_seed(0)
        query = F.normalize(torch.randn((query_tokens, dim), generator=g, device=device), dim=-1).to(dtype)
        documents = F.normalize(torch.randn((tokens, dim), generator=g, device=device), dim=-1).to(dtype)
        cu = torch.zeros(docs + 1, dtype=torch.int32)
        torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0, out=cu[1:])
        return {"q": query, "d": documents, "cu": cu.to(device)}

    def ref(x):
        return reference.maxsim(x["q"], x["d"], x["cu"])

    def padded(x):  # the plain torch formula on documents already padded: einsum, masked max, sum
        device = x["d"].device
        real = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).to(device)  # (docs, longest)
        pad = x["d"].new_zeros(docs, max(lengths), dim)
        pad[real] = x["d"]

        def run():
            scores = torch.einsum("qh,bth->bqt", x["q"], pad).masked_fill(~real[:, None, :], float("-inf"))
            return scores.amax(-1).float().sum(-1)

        return run, _identity

    def work(dtype):
        return (query_tokens + tokens) * dim * dtype.itemsize + 4 * (docs + 1) + 4 * docs

    size = f"{docs}x{min_len}-{max_len}"
    return KernelCase("maxsim", f"maxsim:d{dim}-q{query_tokens}:{size}", docs, max_len, tokens, make_inputs, ref,
                      {"fastenc": _kernel("maxsim", lambda f, x: f(x["q"], x["d"], x["cu"])), "torch": _twin(ref),
                       "torch-padded": padded},
                      work, "GB/s", baseline="torch-padded",
                      also=(("TFLOP/s", lambda dtype: 2 * query_tokens * tokens * dim),))


def kernel_cases(device_type: str, quick: bool) -> list[KernelCase]:
    """The kernel plan: attention over sequence lengths; the token-wise kernels at the e2e shapes."""
    if device_type == "cuda":
        seqs = (128, 512, 2048) if quick else (128, 256, 512, 1024, 2048, 4096)
        attention = [attention_case(max(1, 32768 // s), s, var) for var in (False, True) for s in seqs]
        shapes = ((32, 128), (32, 512)) if quick else ((32, 128), (32, 512), (128, 512))
        hiddens = ((768, 12),) if quick else ((768, 12), (1024, 16))
    elif quick:  # tiny: also what the tests run through the Triton interpreter
        attention = [attention_case(2, 32, var, heads=2) for var in (False, True)]
        shapes, hiddens = ((2, 8),), ((64, 2),)
    else:
        attention = [attention_case(4, s, var) for var in (False, True) for s in (128, 256)]
        shapes, hiddens = ((8, 128),), ((768, 12),)
    cases = list(attention)
    if device_type == "cuda":  # ColBERT's shape (the issue's CPU case at GPU scale), and BGE-M3's 1024 dims
        cases += [maxsim_case(1000, 50, 300), maxsim_case(10000, 50, 300)]
        cases += [] if quick else [maxsim_case(1000, 50, 300, dim=1024)]
    else:
        cases.append(maxsim_case(4, 8, 32, query_tokens=8, dim=32) if quick else maxsim_case(1000, 50, 300))
    for batch, seq in shapes:
        for hidden, heads in hiddens:
            cases += [
                fused_qkv_case(batch, seq, hidden, heads),
                linear_case(batch, seq, hidden, 4 * hidden, "gelu"),
                linear_case(batch, seq, 4 * hidden, hidden, None),
                add_layer_norm_case(batch, seq, hidden),
                gelu_layer_norm_case(batch, seq, hidden),
                embeddings_case(batch, seq, hidden, vocab=1000 if quick else 30522),
            ]
    return cases


def fp8_kernel_cases(device_type: str, quick: bool) -> list[KernelCase]:
    """The FP8 kernel plan (``--dtype fp8``): the FP8 GEMM at each hidden size's two FFN shapes."""
    if device_type == "cuda":
        shapes = ((32, 128), (32, 512)) if quick else ((32, 128), (32, 512), (128, 512))
        hiddens = (768,) if quick else (768, 1024)
    elif quick:
        shapes, hiddens = ((2, 8),), (64,)
    else:
        shapes, hiddens = ((8, 128),), (768,)
    return [linear_fp8_case(batch, seq, n_in, n_out) for batch, seq in shapes for hidden in hiddens
            for n_in, n_out in ((hidden, 4 * hidden), (4 * hidden, hidden))]


def _kernel_provider_unavailable(name: str, device: torch.device) -> str | None:
    if name == "fastenc":
        from ..model import resolve_backend

        try:
            resolve_backend("triton", device)
        except BackendError as exc:
            return str(exc)
        return None
    if name in ("sdpa-varlen", "flash-attn", "torch-scaled-mm") and device.type != "cuda":
        return "needs CUDA"
    if name == "flash-attn" and importlib.util.find_spec("flash_attn") is None:
        return "flash_attn is not installed"
    if name == "torch-scaled-mm" and torch.cuda.get_device_capability(device) < (8, 9):
        return "torch._scaled_mm needs FP8 tensor cores (sm_89 or sm_90)"
    if name == "sdpa-varlen" and importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    return None


@dataclasses.dataclass(frozen=True)
class KernelRun:
    """One kernel case in one dtype, with the providers to run on it. ``after_e2e``: run after the e2e cases,
    not before them (an extended tier's case, whose first launch on a new GPU must not cost the core ones)."""

    case: KernelCase
    dtype: str
    providers: tuple[str, ...]
    after_e2e: bool = False

    @property
    def name(self) -> str:
        return self.case.case


def run_kernels(plan, report: Report, budget, after_e2e: bool = False) -> None:
    """The cases of ``plan.kernels`` (a ``suite.Plan``) whose ``after_e2e`` is ``after_e2e``, each provider
    checked against the float32 torch twin before it is timed; the results file rewritten after each case."""
    from .estimate import kernel_case_seconds

    device = plan.device
    runs = [run for run in plan.kernels if run.after_e2e == after_e2e]
    names = list(dict.fromkeys(name for run in runs for name in run.providers))
    unavailable = {name: _kernel_provider_unavailable(name, device) for name in names}
    for dtype_name in dict.fromkeys(run.dtype for run in runs):
        for name, reason in unavailable.items():
            if reason:
                report.skip("kernel", "all", name, dtype_name, reason)
    for run in runs:
        estimate = kernel_case_seconds(plan, run, budget.peaks)
        refused = budget.refuse(estimate)
        if refused:
            report.skip("kernel", run.name, "all", run.dtype, refused)
            continue
        report.log(f"kernel {run.name} {run.dtype}")
        report.scope.add(("kernel", run.dtype, run.name))
        started = time.monotonic()
        try:
            _run_kernel_case(plan, report, run, unavailable)
        except Exception as exc:  # noqa: BLE001 - e.g. a sticky device fault: the case is lost, not the run
            report.skip("kernel", run.name, "all", run.dtype, f"the case failed: {_exc_line(exc)}")
        report.case_time("kernel", run.name, run.dtype, estimate, time.monotonic() - started)
        report.flush()
        release(device)


def _run_kernel_case(plan, report: Report, run: KernelRun, unavailable: dict) -> None:
    device, case, dtype_name = plan.device, run.case, run.dtype
    dtype = compute_dtype(dtype_name)
    try:
        inputs = case.make_inputs(device, dtype)
        upcast = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                  for k, v in inputs.items()}
        expected = case.reference(upcast)
        baseline = case.reference(inputs) if dtype != torch.float32 else None
    except Exception as exc:  # noqa: BLE001
        report.skip("kernel", case.case, "all", dtype_name, f"inputs or reference failed: {_exc_line(exc)}")
        return
    fns = {}
    for name in run.providers:
        if unavailable.get(name) or name not in case.providers:
            continue
        try:
            fn, canonical = case.providers[name](inputs)
            out = canonical(fn())
            check = device_compare(f"{name} {case.case}", out, expected, baseline)
            del out
        except Exception as exc:  # noqa: BLE001
            report.skip("kernel", case.case, name, dtype_name, _exc_line(exc))
            continue
        if not check.ok:  # never time a wrong answer
            report.skip("kernel", case.case, name, dtype_name, f"output check against the float32 torch twin "
                        f"failed: {check.line()}")
            continue
        fns[name] = fn
    del expected, baseline
    work = case.work(dtype)
    for name, timing in time_providers(fns, device, plan.repeats).items():
        if isinstance(timing, Exception):
            report.skip("kernel", case.case, name, dtype_name, f"failed while timed: {_exc_line(timing)}")
            continue
        base = {"suite": "kernel", "case": case.case, "provider": name, "dtype": dtype_name, "batch": case.batch,
                "seq": case.seq, "tokens": case.tokens, "kernel": case.kernel, "baseline": case.baseline,
                "mode": "eager"}
        report.add_rates(base, timing, [(case.unit, work), *((unit, also(dtype)) for unit, also in case.also)])
        rate = work / (timing.median * 1e-3) / (1e12 if case.unit == "TFLOP/s" else 1e9)
        report.log(f"  {case.case} {dtype_name} {name}: {timing.median:.4f} ms, {rate:.3g} {case.unit}")
