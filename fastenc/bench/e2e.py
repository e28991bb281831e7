"""The end-to-end suite of ``fastenc bench``: the models (built locally or bundled), the padded batches,
the providers (fastenc and transformers) and the run that checks each provider before timing it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib.util
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..check import compare
from .measure import DTYPES, _sync, encoder_flops, memory_peak_mib, time_providers
from .report import E2E_BASELINE, Report, _exc_line


# ============================================================================================= models
@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model the e2e suite runs: the bundled MiniLM (``layers=None``), or a BERT of the given shape with
    random weights built locally."""

    name: str
    layers: int | None = None
    hidden: int = 768
    heads: int = 12
    intermediate: int = 3072
    vocab: int = 30522

    def materialize(self, workdir: Path) -> Path:
        """A checkpoint directory (config.json + model.safetensors) both fastenc and transformers load."""
        if self.layers is None:
            from ..encoder import default_model_path
            from ..pooling import SentenceConfig

            return SentenceConfig.from_dir(default_model_path()).transformer_dir
        return make_bert_checkpoint(workdir / self.name, layers=self.layers, hidden=self.hidden, heads=self.heads,
                                    intermediate=self.intermediate, vocab=self.vocab)


MODELS = {
    "bert-base": ModelSpec("bert-base", layers=12),
    "bert-base-2l": ModelSpec("bert-base-2l", layers=2),  # BERT-base width, 2 layers: the CPU's stand-in
    "minilm": ModelSpec("minilm"),
}


def make_bert_checkpoint(path: Path, *, layers: int = 12, hidden: int = 768, heads: int = 12,
                         intermediate: int = 3072, vocab: int = 30522, seed: int = 0) -> Path:
    """A BERT checkpoint with random, perturbed weights (LayerNorms not 1/0), built locally."""
    from transformers import BertConfig, BertModel

    if (path / "model.safetensors").exists():
        return path
    config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=intermediate, max_position_embeddings=512, type_vocab_size=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config, add_pooling_layer=False).eval()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "LayerNorm.weight" in name:
                    param.copy_(1.0 + 0.1 * torch.randn_like(param))
                elif name.endswith("bias"):
                    param.copy_(0.02 * torch.randn_like(param))
                else:
                    param.add_(0.002 * torch.randn_like(param))
    with _quiet_transformers():
        model.save_pretrained(path)
    return path


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


# ========================================================================================= e2e inputs
@dataclasses.dataclass(frozen=True)
class Shape:
    """``batch`` sequences of ``seq`` tokens, or of lengths drawn uniformly from ``[var_min, seq]``."""

    batch: int
    seq: int
    var_min: int | None = None

    @property
    def var(self) -> bool:
        return self.var_min is not None

    def lengths(self, seed: int = 0) -> list[int]:
        if not self.var:
            return [self.seq] * self.batch
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(self.var_min, self.seq + 1, (self.batch,), generator=generator).tolist()

    def case(self) -> str:
        return f"var{self.batch}x{self.var_min}-{self.seq}" if self.var else f"{self.batch}x{self.seq}"


def e2e_shapes(device_type: str, quick: bool) -> list[Shape]:
    if device_type == "cuda":
        if quick:
            return [Shape(1, 128), Shape(32, 128), Shape(64, 512, var_min=8)]
        return [Shape(1, 128), Shape(32, 128), Shape(128, 128), Shape(32, 512), Shape(64, 512, var_min=8)]
    if quick:
        return [Shape(1, 16), Shape(2, 32), Shape(4, 32, var_min=8)]
    return [Shape(1, 128), Shape(8, 128), Shape(16, 256, var_min=8)]


@dataclasses.dataclass
class Inputs:
    """One right-padded batch (CPU int64, as a tokenizer gives it) and its device copy."""

    input_ids: torch.Tensor  # (batch, seq)
    attention_mask: torch.Tensor  # (batch, seq) 0/1
    token_type_ids: torch.Tensor  # (batch, seq)
    lengths: list[int]
    device: torch.device

    @classmethod
    def random(cls, shape: Shape, vocab_size: int, pad_id: int, device: torch.device, seed: int = 0) -> "Inputs":
        lengths = shape.lengths(seed)
        width = max(lengths)
        generator = torch.Generator().manual_seed(seed + 1)
        low = min(1000, vocab_size // 2)  # clear of the special tokens at the start of the vocabulary
        ids = torch.randint(low, vocab_size, (shape.batch, width), generator=generator)
        mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).to(torch.long)
        ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad_id))
        return cls(ids, mask, torch.zeros_like(ids), lengths, device)

    def cpu(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "token_type_ids": self.token_type_ids}

    def on_device(self) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in self.cpu().items()}


# ====================================================================================== e2e providers
@dataclasses.dataclass
class ModelContext:
    """What a provider's loader gets: one model, one device, one dtype."""

    model_dir: Path
    device: torch.device
    dtype: torch.dtype
    backend: str | None  # fastenc backend for the ``fastenc`` providers (None: the device's default)
    cache: dict = dataclasses.field(default_factory=dict)  # shared between providers (one Encoder)


@dataclasses.dataclass
class Runner:
    """A loaded provider: ``prepare(inputs)`` returns the zero-argument call that is timed.

    ``packed``: the call returns ``(tokens, hidden)`` real tokens only, not ``(batch, seq, hidden)``.
    """

    prepare: Callable[[Inputs], Callable[[], torch.Tensor]]
    packed: bool = False


def _encoder(ctx: ModelContext, backend: str | None):
    from ..encoder import Encoder

    key = ("encoder", backend)
    if key not in ctx.cache:
        ctx.cache[key] = Encoder.from_pretrained(ctx.model_dir, device=ctx.device, dtype=ctx.dtype, backend=backend)
    return ctx.cache[key]


def _fastenc_call(backend_override: str | None = None) -> Callable[[ModelContext], Runner]:
    def load(ctx: ModelContext) -> Runner:
        encoder = _encoder(ctx, backend_override or ctx.backend)

        def prepare(inputs: Inputs):
            batch = inputs.cpu()
            return lambda: encoder(**batch)

        return Runner(prepare)

    return load


def _fastenc_packed(ctx: ModelContext) -> Runner:
    encoder = _encoder(ctx, ctx.backend)

    def prepare(inputs: Inputs):
        # What encoder.__call__ does before its forward pass (validation aside), done once here.
        keep = inputs.attention_mask.bool()
        positions = encoder._positions(inputs.input_ids)
        packed = encoder._pack(inputs.input_ids[keep], positions[keep], inputs.token_type_ids[keep], inputs.lengths)

        def run():
            with torch.inference_mode():
                return encoder.forward_packed(packed)

        return run

    return Runner(prepare, packed=True)


def _hf(implementation: str, compiled: bool = False) -> Callable[[ModelContext], Runner]:
    def load(ctx: ModelContext) -> Runner:
        from transformers import AutoModel

        with _quiet_transformers():
            model = AutoModel.from_pretrained(str(ctx.model_dir), attn_implementation=implementation, dtype=ctx.dtype)
        model = model.to(ctx.device).eval()
        forward = torch.compile(model, dynamic=False) if compiled else model

        def prepare(inputs: Inputs):
            batch = inputs.on_device()

            def run():
                with torch.inference_mode():
                    return forward(**batch).last_hidden_state

            return run

        return Runner(prepare)

    return load


def _needs_flash_attn(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "needs CUDA"
    if importlib.util.find_spec("flash_attn") is None:
        return "flash_attn is not installed"
    return None


# name -> (loader, availability check returning the reason it cannot run here, or None)
E2E_PROVIDERS: dict[str, tuple[Callable[[ModelContext], Runner], Callable[[torch.device], str | None]]] = {
    "fastenc": (_fastenc_call(), lambda device: None),
    "fastenc-packed": (_fastenc_packed, lambda device: None),
    "fastenc-torch": (_fastenc_call("torch"), lambda device: None),
    "hf-eager": (_hf("eager"), lambda device: None),
    "hf-sdpa": (_hf("sdpa"), lambda device: None),
    "hf-compile": (_hf("sdpa", compiled=True), lambda device: None),
    "hf-flash": (_hf("flash_attention_2"), _needs_flash_attn),
}
DEFAULT_E2E_PROVIDERS = ("fastenc", "fastenc-packed", "hf-eager", "hf-sdpa", "hf-compile", "hf-flash")
QUICK_SKIPS = {"hf-compile": "not run with --quick: torch.compile spends tens of seconds per shape compiling "
                             "(about 40 s on a 2-core CPU); run without --quick, or name it in --providers"}


def _read_config(model_dir: Path):
    from ..config import EncoderConfig

    return EncoderConfig.from_file(model_dir / "config.json")


def run_e2e(plan, report: Report) -> None:
    """Every provider on every (model, shape, dtype) of ``plan`` (a ``suite.Plan``), checked against hf-sdpa
    before it is timed."""
    device = plan.device
    with tempfile.TemporaryDirectory(prefix="fastenc-bench-") as tmp:
        for dtype_name in plan.dtypes:
            dtype = DTYPES[dtype_name]
            report.scope.add(("e2e", dtype_name, None))  # provider-level skips name no model
            for spec in plan.models:
                report.scope.add(("e2e", dtype_name, spec.name))
                _run_e2e_model(plan, report, spec, Path(tmp), dtype_name, dtype)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()


def _run_e2e_model(plan, report: Report, spec: ModelSpec, workdir: Path, dtype_name: str,
                   dtype: torch.dtype) -> None:
    device = plan.device
    report.log(f"e2e {spec.name} {dtype_name}")
    try:
        model_dir = spec.materialize(workdir)
        config = _read_config(model_dir)
        reference_run = _hf("sdpa")(ModelContext(model_dir, device, torch.float32, None))
        baseline_run = (_hf("sdpa")(ModelContext(model_dir, device, dtype, None))
                        if dtype != torch.float32 else None)
    except Exception as exc:  # noqa: BLE001
        report.skip("e2e", "all", "all", dtype_name, f"the model or its float32 hf-sdpa reference did not load: "
                    f"{_exc_line(exc)}", model=spec.name)
        return
    ctx = ModelContext(model_dir, device, dtype, plan.backend)
    runners: dict[str, Runner] = {}
    for name in plan.providers:
        loader, unavailable = E2E_PROVIDERS[name]
        reason = unavailable(device)
        if reason is None:
            try:
                runners[name] = loader(ctx)
            except Exception as exc:  # noqa: BLE001
                reason = f"failed to load: {_exc_line(exc)}"
        if reason is not None:
            report.skip("e2e", "all", name, dtype_name, reason, model=spec.name)

    for shape in plan.shapes:
        if shape.seq > config.max_length:
            report.skip("e2e", shape.case(), "all", dtype_name,
                        f"sequence {shape.seq} is over the model's {config.max_length} positions", model=spec.name)
            continue
        inputs = Inputs.random(shape, config.vocab_size, config.pad_token_id, device)
        case = shape.case()
        mask = inputs.attention_mask.bool()
        try:
            with torch.inference_mode():
                reference_out = reference_run.prepare(inputs)().float().cpu()  # (batch, seq, hidden)
                baseline_out = baseline_run.prepare(inputs)().float().cpu() if baseline_run else None
        except Exception as exc:  # noqa: BLE001
            report.skip("e2e", case, "all", dtype_name, f"the {E2E_BASELINE} reference failed: {_exc_line(exc)}",
                        model=spec.name)
            continue
        fns, first_call = {}, {}
        for name, runner in runners.items():
            try:
                fn = runner.prepare(inputs)
                start = time.perf_counter()
                out = fn()
                _sync(device)
                first_call[name] = time.perf_counter() - start
                if runner.packed:  # (tokens, hidden): compare with the real tokens of the references
                    check = compare(f"{name} {case}", out, reference_out[mask],
                                    baseline_out[mask] if baseline_out is not None else None)
                else:
                    check = compare(f"{name} {case}", out, reference_out, baseline_out, mask=inputs.attention_mask)
                del out
            except Exception as exc:  # noqa: BLE001
                report.skip("e2e", case, name, dtype_name, _exc_line(exc), model=spec.name)
                continue
            if not check.ok:  # never time a wrong answer
                report.skip("e2e", case, name, dtype_name, f"output check against {E2E_BASELINE} (float32 "
                            f"reference) failed: {check.line()}", model=spec.name)
                continue
            fns[name] = fn
        timings = time_providers(fns, device, plan.repeats)
        flops = encoder_flops(inputs.lengths, config.hidden_size, config.intermediate_size, config.num_hidden_layers)
        tokens = sum(inputs.lengths)
        for name, timing in timings.items():
            if isinstance(timing, Exception):
                report.skip("e2e", case, name, dtype_name, f"failed while timed: {_exc_line(timing)}", model=spec.name)
                continue
            base = {"suite": "e2e", "case": case, "provider": name, "dtype": dtype_name,
                    "batch": shape.batch, "seq": inputs.input_ids.shape[1], "model": spec.name, "tokens": tokens,
                    "mem_mib": memory_peak_mib(fns[name], device), "first_call_s": first_call[name]}
            report.add_rates(base, timing, [("tokens/s", tokens), ("TFLOP/s", flops)])
            report.log(f"  {spec.name} {case} {dtype_name} {name}: {timing.median:.3f} ms "
                       f"({timing.p20:.3f}-{timing.p80:.3f}), {tokens / timing.median * 1e3:,.0f} tokens/s")
        del fns
    del runners, ctx, reference_run, baseline_run
