"""``fastenc bench``: fastenc side by side with ``transformers`` and ``torch``, end to end and per kernel.

    fastenc bench [--plan full|gpu-check] [--suite e2e|kernel|all] [--device cuda|cpu] [--dtype fp16,bf16]
                  [--quick] [--output DIR] [--cases PATTERNS] [--providers NAMES] [--budget SECONDS]

(also ``python -m fastenc bench``, ``python benchmarks/e2e.py`` and ``python benchmarks/kernel_bench.py``).
Everything a run needs lives in this package, so the installed command works without the repository's
``benchmarks/`` folder: ``measure`` (work counted, timing, output checks, memory and peak measurement),
``report`` (the Report, provenance, the results JSON, markdown, plot and README table), ``e2e`` and
``kernels`` (the two suites), ``estimate`` (how long each case takes, for the time budget) and ``suite``
(the plan and the run); each imports only those before it in that list, never one after it.

A plan is a list of cases, each a model and shape (e2e, named ``<model>:<shape>``, e.g.
``bert-base:128x128``, ``bert-base:var64x8-512``) or a kernel at a size (``attention:hd64:64x512``), in a
dtype, with its providers. ``--plan full`` is the cross product of the options; ``--plan gpu-check`` is the
bench stage of the GPU check, ``benchmarks/gpu_check`` (the cases the performance goals need; small shapes
on the CPU). ``--providers`` and ``--cases`` (names or shell patterns) filter exactly: what is named runs,
and nothing else is loaded. ``--budget`` starts a case only when its estimate fits in what is left, and reports every
case it skipped.

What is measured (STYLE point 11: the unit the hardware is judged by):

* **e2e** — a whole encoder forward on a padded batch, for each provider in the same process: ``fastenc``
  (the public ``encoder(input_ids, attention_mask, token_type_ids)`` call from CPU tensors: validation,
  packing, host-to-device copies and the padded output included; on CUDA it replays a CUDA graph when the
  batch fits one), ``fastenc-packed`` (``encoder.forward_packed`` on a prepared ``PackedBatch``: the kernels
  alone, launched eagerly), ``hf-eager``, ``hf-sdpa``, ``hf-compile`` (``torch.compile(dynamic=False,
  fullgraph=True)`` of the SDPA model) and ``hf-flash`` (flash_attention_2, when ``flash_attn`` is
  importable). Every row says what ran (``mode``: ``graph``, ``eager`` or ``compiled``). The models are
  built locally with transformers' own classes and random perturbed weights: BERT shapes (``bert-base``,
  ``minilm-l6``: all-MiniLM-L6-v2's shape, ``bert-base-2l``) and the families after BERT at their base
  checkpoints' shapes (``mpnet-base``, ``modernbert-base``: 22 layers, GeGLU, windows of 128 with a global
  layer every third, ``nomic-embed``: nomic-embed-text-v1.5's, ``gte-base``: gte-base-en-v1.5's) with CPU
  stand-ins of the same width (``mpnet-base-2l``, ``modernbert-base-3l``: one global and two local layers,
  ``nomic-embed-2l``, ``gte-base-2l``); speed does not depend on the values, and nothing has to be
  downloaded or carried. The transformers models get their inputs already on the device; a model without
  token types (MPNet, ModernBERT) is given none, by either side. Where transformers has no SDPA (or flash)
  attention for a family (MPNet), those providers are reported as not measured with that reason, and the
  float32 reference and low-precision baseline run its eager attention instead. Metrics: latency (median, p20, p80),
  tokens/s and TFLOP/s on *real* tokens, the TFLOP/s as a share of the matmul peak measured in the same
  run, the first call's time (compilation included), and on CUDA the memory one call needs above the
  resident weights: its peak allocation plus what the provider keeps between calls for it (a CUDA graph's
  pool, measured around the call that captured it).
* **fp8** (``--dtype fp8``) — fastenc's FP8 encoder (e4m3 GEMMs, 16-bit activations) alone in e2e:
  transformers has no FP8 path for encoders, and its fp16 rows of the same case are the comparison; the
  low-precision baseline of its output check is transformers in float32 with fastenc's e4m3 roundings
  (``fastenc.check.fp8_baseline``). In the kernel suite, the FP8 GEMM on e4m3 codes against
  ``torch._scaled_mm`` with row-wise scales (both without bias, bfloat16 out).
* **kernel** — each fastenc kernel against its torch twin (``fastenc.reference``) and, for attention,
  against ``torch.nn.functional.scaled_dot_product_attention`` (default dispatch, and forced to the
  flash backend), ``torch.nn.attention.varlen.varlen_attn`` and ``flash_attn`` when present. GEMMs and
  attention in TFLOP/s, memory-bound kernels (LayerNorms, embeddings) in GB/s and as a share of the
  copy bandwidth measured in the same run. Variable-length cases are named by their size
  (``var64x8-512``: 64 sequences of lengths drawn from 8..512) and carry their real token count.

Work counted (the fewest operations and bytes the computation needs, never what a padded provider
spends): an encoder layer over ``T`` real tokens in sequences of lengths ``L_i``, hidden ``H``,
intermediate ``I``, does ``2·T·(4·H² + 2·H·I)`` FLOPs in its four projections (Q, K, V, output: ``4·H²``
per token; FFN in and out: ``2·H·I``) plus ``4·Σ L_i²·H`` in attention (``QKᵀ`` and ``PV``, each
``2·L_i²·head_dim`` per head). A gated FFN (GeGLU, SwiGLU: ModernBERT, NomicBERT, GTE) projects ``H → 2·I``
first: ``2·T·(4·H² + 3·H·I)``. A sliding-window layer (ModernBERT's local layers: keys within ``±w`` of the
query) counts only the pairs within its window, ``L² - (L-w-1)(L-w)`` per sequence longer than ``w + 1``:
the pairs the result needs, not the masked remainder of the key blocks the window's edges cut, nor the
full ``L²`` transformers' eager and SDPA attention compute and mask. Embeddings, LayerNorms, softmax,
activations, RoPE and MPNet's relative bias are not counted.
Memory-bound kernels count each input read once and each output written once.

Timing: on CUDA ``triton.testing.do_bench`` (CUDA events, warm-up first, L2 flushed between runs,
enough runs for a stable median) with quantiles 0.5, 0.2 and 0.8; on the CPU interleaved
``time.perf_counter`` rounds (every provider once per round, so drift hits all alike). p20/p80 of a
rate (tokens/s, TFLOP/s, GB/s) are the rates at the p80/p20 times, so ``p20 <= value <= p80`` always.

Correctness before speed: every provider's output is checked before it is timed, with ``fastenc.check``'s
tolerance rule applied where the tensors live (``measure.device_compare``: only four scalars come back
from the GPU) against a float32 reference (``hf-sdpa`` run in float32 for e2e, the torch twin on float32
inputs for kernels), with ``hf-sdpa`` / the torch twin in the run's dtype as the low-precision baseline;
e2e on real tokens only. A provider that raises, is unavailable, or fails the check is *reported*
(``"skipped"`` in the JSON, "Not measured" in the markdown, a line on stderr) and gets no row: no NaN
rows, no silent drops. ``hf-compile`` resets Dynamo per model and dtype and makes a graph break or a
recompile past Dynamo's limit an error: such a case is a skip, never an eager run labelled compiled.

Peaks are measured in the run, never assumed: a large square GEMM (bf16 on CUDA, fp32 on the CPU) and a
large ``dst.copy_(src)`` counting bytes read plus bytes written, before and after the suites; the higher
of the two is the ceiling every ``share_of_peak`` divides by.

Results: ``<gpu>-<yyyymmdd>.json`` (``cpu-…`` on the CPU, ``…-quick`` for ``--quick`` and small-shape
runs) in the schema ``{"env", "peaks", "runs", "rows", "skipped"}``, rewritten whole after every case (a
timeout or a sticky device fault loses at most the case in flight; every measurement is guarded), the
same stem ``.md`` (a markdown table, with each case's time beside its estimate) and ``.png`` (a plot, when
matplotlib is installed). A run keeps the rows of an earlier run in the same file for the cases it does
not plan, each row naming its run and each run keeping its own peaks, so a GPU session can split the work
over several commands. The commit comes from ``FASTENC_BENCH_COMMIT``, else git, else the
``.gpu/provenance.json`` that ``python -m benchmarks.gpu_check --bundle`` writes (checked against the
tree's files: ``-modified`` when they changed since).

On a GPU: ``pip install 'fastenc[bench]'`` (transformers, matplotlib), then ``fastenc bench --device cuda``
(fp16 and bf16, BERT-base and MiniLM-L6 shapes, fastenc on its Triton backend), whole or in parts into the
same file; from a source tree with nothing installed, ``python -m fastenc bench ... --output DIR`` from the
tree's root. Where matplotlib was missing, ``python -m fastenc.bench render RESULTS.json [--readme
README.md]`` writes the plot (and the README table) afterwards; ``python -m fastenc.bench estimate --plan
gpu-check`` prints a plan's cases with their estimated seconds.
"""

from .e2e import E2E_PROVIDERS, MODELS, E2ECase, Inputs, ModelSpec, Runner, Shape
from .estimate import Budget, plan_estimate
from .kernels import KernelCase, KernelRun, add_layer_norm_case, kernel_cases
from .measure import DTYPES, Timing, attended_pairs, attention_flops, device_compare, encoder_flops, time_cpu
from .report import README_END, README_START, Report, git_commit, markdown, plot, render, update_readme, write_results
from .suite import Plan, check_plan, make_plan, run, run_from_args

__all__ = [
    "make_plan", "check_plan", "run", "run_from_args", "render", "Plan", "Report", "Timing", "DTYPES", "Budget",
    "ModelSpec", "MODELS", "Shape", "E2ECase", "Inputs", "Runner", "E2E_PROVIDERS",
    "KernelCase", "KernelRun", "kernel_cases", "add_layer_norm_case",
    "encoder_flops", "attention_flops", "attended_pairs", "time_cpu", "device_compare", "plan_estimate", "git_commit",
    "markdown", "plot", "update_readme", "write_results", "README_START", "README_END",
]
