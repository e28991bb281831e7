"""The end-to-end suite of ``fastenc bench``: the models (BERT shapes built locally), the padded batches,
the providers (fastenc and transformers) and the run that checks each provider before timing it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .measure import (FP8, _sync, compute_dtype, device_compare, encoder_flops, memory_peak_mib, release,
                      settled_reserved, time_providers)
from .report import E2E_BASELINE, Report, _exc_line


# ============================================================================================= models
FAMILIES = ("bert", "mpnet", "modernbert", "nomic_bert", "gte", "deberta-v2", "qwen3")  # the ``model_type`` built
GATED_FAMILIES = ("modernbert", "nomic_bert", "gte", "qwen3")  # GeGLU / SwiGLU: the FFN-in projection is H -> 2·I
DEBERTA_BUCKETS = 256  # DeBERTa-v3's position_buckets
TOKEN_TYPE_FAMILIES = ("bert", "nomic_bert", "gte")  # their transformers models take token_type_ids


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """An encoder shape the e2e suite runs, built locally with transformers' own classes (``family``: its
    ``model_type``) and random perturbed weights.

    Speed does not depend on the weights' values, and a local build needs no download and nothing that
    cannot travel to a GPU machine (the bundled all-MiniLM-L6-v2 is not there; its real weights serve the
    ``embed`` comparison of the GPU check, ``benchmarks/gpu_check``, only). ``local_attention`` and
    ``global_every`` are ModernBERT's: a global layer every ``global_every`` layers (the first is one),
    sliding windows of ``local_attention`` tokens (keys within ``±local_attention // 2``) between;
    ``model`` builds it. DeBERTa (``deberta-v2``) is built as DeBERTa-v3 is configured: 256 position
    buckets, c2p and p2c, shared position keys, normalised relative embeddings, no absolute positions, no
    token types. Qwen3 (``qwen3``, the decoder backbone of Qwen3-Embedding and Qwen3-Reranker) takes
    ``kv_heads`` (grouped-query attention) and ``head_dim`` (128, not hidden / heads), QK-norm, causal
    attention, tied embeddings.
    """

    name: str
    layers: int = 12
    hidden: int = 768
    heads: int = 12
    intermediate: int = 3072
    vocab: int = 30522
    family: str = "bert"
    local_attention: int = 128
    global_every: int = 3
    kv_heads: int | None = None  # the decoders' K/V heads (None: heads)
    head_dim: int | None = None  # None: hidden / heads

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"ModelSpec {self.name!r}: family {self.family!r} is not one of {', '.join(FAMILIES)}")

    def materialize(self, workdir: Path) -> Path:
        """A checkpoint directory (config.json + model.safetensors) both fastenc and transformers load."""
        path = workdir / self.name
        if not (path / "model.safetensors").exists():
            model = self.model()
            with _quiet_transformers():
                model.save_pretrained(path)
        return path

    def config(self):
        """transformers' own config of this shape (its defaults are the base checkpoints' except where set)."""
        if self.family == "bert":
            from transformers import BertConfig

            return BertConfig(vocab_size=self.vocab, hidden_size=self.hidden, num_hidden_layers=self.layers,
                              num_attention_heads=self.heads, intermediate_size=self.intermediate,
                              max_position_embeddings=512, type_vocab_size=2)
        return _family_config(self)

    def model(self, seed: int = 0, *, weights: bool = True):
        """transformers' model of this shape, without a pooler, in eval mode. ``weights``: random and perturbed
        (LayerNorm weights ``1 + 0.1·randn``, biases ``0.02·randn``, the rest ``+ 0.002·randn``, from ``seed``);
        False: on the ``meta`` device, for the parameters' names and shapes alone."""
        from transformers import AutoModel

        config = self.config()
        kwargs = {"add_pooling_layer": False} if self.family in ("bert", "mpnet") else {}
        with torch.random.fork_rng(devices=[]), _quiet_transformers(), \
                (contextlib.nullcontext() if weights else torch.device("meta")):
            torch.manual_seed(seed)
            model = AutoModel.from_config(config, **kwargs).eval()
            if weights:
                _perturb(model)
        return model

    @property
    def gated(self) -> bool:
        return self.family in GATED_FAMILIES

    @property
    def token_types(self) -> int:
        """The checkpoint's ``type_vocab_size`` (0: its transformers model takes no token_type_ids)."""
        return {"bert": 2, "nomic_bert": 2, "gte": 1}.get(self.family, 0)

    @property
    def max_positions(self) -> int:
        """``max_position_embeddings`` (MPNet's 514: positions start after its padding id, 512 usable)."""
        return {"bert": 512, "mpnet": 514, "nomic_bert": 2048, "deberta-v2": 512}.get(self.family, 8192)

    @property
    def pad_id(self) -> int:
        return {"mpnet": 1, "modernbert": 50283 if self.vocab > 50283 else 3, "gte": 1,
                "qwen3": 151643 if self.vocab > 151643 else 0}.get(self.family, 0)

    @property
    def widths(self) -> tuple[int, int]:
        """The Q (heads·head_dim) and K/V (kv_heads·head_dim) widths of the attention projections."""
        head_dim = self.head_dim or self.hidden // self.heads
        return self.heads * head_dim, (self.kv_heads or self.heads) * head_dim

    @property
    def windows(self) -> tuple[int | None, ...]:
        """Per layer, the sliding window (keys within ``±window`` of the query) or None (every key)."""
        if self.family != "modernbert":
            return (None,) * self.layers
        return tuple(None if i % self.global_every == 0 else self.local_attention // 2 for i in range(self.layers))

    def flops(self, lengths: list[int]) -> int:
        """``encoder_flops`` for this family: gated FFNs count three ``H×I`` projections, sliding-window
        layers only the pairs within their window, DeBERTa's attention its c2p and p2c dot products."""
        attention, kv = self.widths
        return encoder_flops(lengths, self.hidden, self.intermediate, self.layers, gated=self.gated,
                             windows=self.windows, relative_terms=2 if self.family == "deberta-v2" else 0,
                             attention=attention, kv=kv)

    @property
    def parameters(self) -> int:
        """The checkpoint's parameter count, per family (``tests/test_bench.py`` checks it against transformers)."""
        h, i, layers = self.hidden, self.intermediate, self.layers
        embeddings = self.vocab * h + self.token_types * h
        if self.family == "qwen3":  # no biases; RMSNorms: 2 per layer, the final one, QK-norm's 2 per layer
            attention, kv = self.widths
            head_dim = attention // self.heads
            return embeddings + h + layers * (2 * h * attention + 2 * h * kv + 3 * h * i + 2 * h + 2 * head_dim)
        if self.family == "modernbert":  # no biases; LayerNorms without bias; block 0 has no attention norm
            return embeddings + h + layers * (4 * h * h + 3 * h * i + 2 * h)
        embeddings += 2 * h  # the embeddings' LayerNorm
        if self.family in ("bert", "mpnet"):  # absolute positions; biases everywhere; MPNet's 32 buckets per head
            embeddings += self.max_positions * h + (32 * self.heads if self.family == "mpnet" else 0)
            return embeddings + layers * (4 * h * h + 2 * h * i + 9 * h + i)
        if self.family == "deberta-v2":  # BERT's blocks; 2 x 256 relative embeddings and their LayerNorm
            return embeddings + 2 * DEBERTA_BUCKETS * h + 2 * h + layers * (4 * h * h + 2 * h * i + 9 * h + i)
        if self.family == "nomic_bert":  # linears without bias
            return embeddings + layers * (4 * h * h + 3 * h * i + 4 * h)
        return embeddings + layers * (4 * h * h + 3 * h * i + 9 * h)  # gte: no bias on the gated FFN-in


MODELS = {
    "bert-base": ModelSpec("bert-base"),
    "bert-base-2l": ModelSpec("bert-base-2l", layers=2),  # BERT-base width, 2 layers: the CPU's stand-in
    "minilm-l6": ModelSpec("minilm-l6", layers=6, hidden=384, heads=12, intermediate=1536),  # all-MiniLM-L6's shape
    # The families after BERT at their base checkpoints' shapes (all-mpnet-base-v2, ModernBERT-base,
    # nomic-embed-text-v1.5, gte-base-en-v1.5), and their CPU stand-ins at the same width: 2 layers
    # (ModernBERT 3: one global, two local, its ratio).
    "mpnet-base": ModelSpec("mpnet-base", vocab=30527, family="mpnet"),
    "modernbert-base": ModelSpec("modernbert-base", layers=22, intermediate=1152, vocab=50368, family="modernbert"),
    "nomic-embed": ModelSpec("nomic-embed", vocab=30528, family="nomic_bert"),
    "gte-base": ModelSpec("gte-base", vocab=30528, family="gte"),
    "mpnet-base-2l": ModelSpec("mpnet-base-2l", layers=2, vocab=30527, family="mpnet"),
    "modernbert-base-3l": ModelSpec("modernbert-base-3l", layers=3, intermediate=1152, vocab=50368,
                                    family="modernbert"),
    "nomic-embed-2l": ModelSpec("nomic-embed-2l", layers=2, vocab=30528, family="nomic_bert"),
    "gte-base-2l": ModelSpec("gte-base-2l", layers=2, vocab=30528, family="gte"),
    # DeBERTa-v3-base (12 x 768, its 128k vocabulary) and its CPU stand-in
    "deberta-v3-base": ModelSpec("deberta-v3-base", vocab=128100, family="deberta-v2"),
    "deberta-v3-base-2l": ModelSpec("deberta-v3-base-2l", layers=2, vocab=128100, family="deberta-v2"),
    # Qwen3-Embedding-0.6B / Qwen3-Reranker-0.6B (28 x 1024, 16 query and 8 K/V heads of 128) and its CPU
    # stand-in at the same width
    "qwen3-0.6b": ModelSpec("qwen3-0.6b", layers=28, hidden=1024, heads=16, kv_heads=8, head_dim=128,
                            intermediate=3072, vocab=151669, family="qwen3"),
    # 12 of its 28 layers: the GPU check's stand-in, within its time budget (the same per-layer work)
    "qwen3-0.6b-12l": ModelSpec("qwen3-0.6b-12l", layers=12, hidden=1024, heads=16, kv_heads=8, head_dim=128,
                                intermediate=3072, vocab=151669, family="qwen3"),
    "qwen3-0.6b-2l": ModelSpec("qwen3-0.6b-2l", layers=2, hidden=1024, heads=16, kv_heads=8, head_dim=128,
                               intermediate=3072, vocab=151669, family="qwen3"),
}


def _perturb(model: torch.nn.Module) -> None:
    """Every parameter away from its initialisation: LayerNorm weights ``1 + 0.1·randn``, biases ``0.02·randn``,
    the rest ``+ 0.002·randn`` (in ``named_parameters`` order, from the caller's generator state)."""
    norms = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, torch.nn.LayerNorm)}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in norms:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.02 * torch.randn_like(param))
            else:
                param.add_(0.002 * torch.randn_like(param))


def _family_config(spec: ModelSpec):
    """transformers' own config for ``spec`` (its defaults are the base checkpoints' except where set)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if spec.family not in CONFIG_MAPPING:
        raise RuntimeError(f"transformers {transformers.__version__} has no {spec.family!r} model to build "
                           f"{spec.name} with")
    sizes = dict(vocab_size=spec.vocab, hidden_size=spec.hidden, num_hidden_layers=spec.layers,
                 num_attention_heads=spec.heads, intermediate_size=spec.intermediate,
                 max_position_embeddings=spec.max_positions, pad_token_id=spec.pad_id)
    if spec.family == "modernbert":
        specials = dict(bos_token_id=spec.pad_id - 2, cls_token_id=spec.pad_id - 2, eos_token_id=spec.pad_id - 1,
                        sep_token_id=spec.pad_id - 1)
        return CONFIG_MAPPING["modernbert"](**sizes, **specials, hidden_activation="gelu", local_attention=
                                            spec.local_attention, global_attn_every_n_layers=spec.global_every)
    if spec.family == "mpnet":
        return CONFIG_MAPPING["mpnet"](**sizes, hidden_act="gelu", bos_token_id=0, eos_token_id=2)
    if spec.family == "qwen3":  # Qwen3-0.6B's config.json
        attention, kv = spec.widths
        return CONFIG_MAPPING["qwen3"](**sizes, num_key_value_heads=kv // (attention // spec.heads),
                                       head_dim=attention // spec.heads, hidden_act="silu", rms_norm_eps=1e-6,
                                       tie_word_embeddings=True,
                                       rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})
    if spec.family == "deberta-v2":  # DeBERTa-v3's config.json
        return CONFIG_MAPPING["deberta-v2"](**sizes, hidden_act="gelu", type_vocab_size=0, layer_norm_eps=1e-7,
                                            relative_attention=True, position_buckets=DEBERTA_BUCKETS,
                                            max_relative_positions=-1, pos_att_type=["p2c", "c2p"],
                                            share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False)
    act = "silu" if spec.family == "nomic_bert" else "gelu"  # SwiGLU (nomic-embed), GeGLU (gte-*-v1.5)
    return CONFIG_MAPPING[spec.family](**sizes, hidden_act=act, type_vocab_size=spec.token_types)


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
    """One right-padded batch (CPU int64, as a tokenizer gives it) and its device copy.

    ``token_type_ids`` is None for a model without token types (MPNet, ModernBERT): neither fastenc nor
    transformers is then passed any.
    """

    input_ids: torch.Tensor  # (batch, seq)
    attention_mask: torch.Tensor  # (batch, seq) 0/1
    token_type_ids: torch.Tensor | None  # (batch, seq)
    lengths: list[int]
    device: torch.device

    @classmethod
    def random(cls, shape: Shape, vocab_size: int, pad_id: int, device: torch.device, seed: int = 0,
               token_types: bool = True) -> "Inputs":
        lengths = shape.lengths(seed)
        width = max(lengths)
        generator = torch.Generator().manual_seed(seed + 1)
        low = min(1000, vocab_size // 2)  # clear of the special tokens at the start of the vocabulary
        ids = torch.randint(low, vocab_size, (shape.batch, width), generator=generator)
        ids = torch.where(ids == pad_id, torch.full_like(ids, low), ids)  # ModernBERT's specials lie at the end
        mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).to(torch.long)
        ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad_id))
        return cls(ids, mask, torch.zeros_like(ids) if token_types else None, lengths, device)

    def cpu(self) -> dict[str, torch.Tensor]:
        batch = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.token_type_ids is not None:
            batch["token_type_ids"] = self.token_type_ids
        return batch

    def on_device(self) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in self.cpu().items()}


@dataclasses.dataclass(frozen=True)
class E2ECase:
    """One model at one shape and dtype, with the providers to run on it."""

    model: ModelSpec
    shape: Shape
    dtype: str
    providers: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.model.name}:{self.shape.case()}"


# ====================================================================================== e2e providers
@dataclasses.dataclass
class ModelContext:
    """What a provider's loader gets: one model, one device, one dtype (``fastenc_dtype``: what fastenc loads
    with when it is not ``dtype``, ``"fp8"`` for the FP8 cases, whose activations are ``dtype``)."""

    model_dir: Path
    device: torch.device
    dtype: torch.dtype
    backend: str | None  # fastenc backend for the ``fastenc`` providers (None: the device's default)
    compile_backend: str = "inductor"  # torch.compile's backend for hf-compile
    fastenc_dtype: str | None = None
    cache: dict = dataclasses.field(default_factory=dict)  # shared between providers (one Encoder, one HF model)


@dataclasses.dataclass
class Runner:
    """A loaded provider: ``prepare(inputs)`` returns the zero-argument call that is timed.

    ``packed``: the call returns ``(tokens, hidden)`` real tokens only, not ``(batch, seq, hidden)``.
    ``mode``: what a call runs, ``"graph"`` (a CUDA graph replay), ``"eager"`` or ``"compiled"``; a function of
    the inputs where that depends on them. ``compiled``: torch.compile'd (its compiles are counted).
    """

    prepare: Callable[[Inputs], Callable[[], torch.Tensor]]
    packed: bool = False
    mode: str | Callable[[Inputs], str] = "eager"
    compiled: bool = False

    def mode_for(self, inputs: Inputs) -> str:
        return self.mode(inputs) if callable(self.mode) else self.mode


def _encoder(ctx: ModelContext, backend: str | None):
    from ..encoder import Encoder

    key = ("encoder", backend)
    if key not in ctx.cache:
        ctx.cache[key] = Encoder.from_pretrained(ctx.model_dir, device=ctx.device, dtype=ctx.fastenc_dtype or ctx.dtype,
                                                 backend=backend)
    return ctx.cache[key]


def _fastenc_call(backend_override: str | None = None) -> Callable[[ModelContext], Runner]:
    def load(ctx: ModelContext) -> Runner:
        encoder = _encoder(ctx, backend_override or ctx.backend)

        def prepare(inputs: Inputs):
            batch = inputs.cpu()
            return lambda: encoder(**batch)

        def mode(inputs: Inputs) -> str:  # the public call replays a CUDA graph when the batch fits one
            graphs = encoder.model.graphs
            return "graph" if graphs is not None and graphs.fits(encoder.pack(**inputs.cpu())) else "eager"

        return Runner(prepare, mode=mode)

    return load


def _fastenc_packed(ctx: ModelContext) -> Runner:
    encoder = _encoder(ctx, ctx.backend)

    def prepare(inputs: Inputs):
        # What encoder.__call__ does before its forward pass (validation and packing), done once here.
        packed = encoder.pack(**inputs.cpu()).to(encoder.device)

        def run():
            with torch.inference_mode():
                return encoder.forward_packed(packed)

        return run

    return Runner(prepare, packed=True)  # forward_packed never replays a graph: eager


def _hf_model(ctx: ModelContext, implementation: str, fp8: bool = False):
    """One transformers model per attention implementation, shared by the providers that use it. ``fp8``: the
    model quantized as fastenc's FP8 path quantizes (``fastenc.check.fp8_baseline``; ``ctx.dtype`` float32),
    the baseline of the FP8 cases' output check."""
    key = ("hf", implementation, fp8)
    if key not in ctx.cache:
        from transformers import AutoModel

        with _quiet_transformers():
            model = AutoModel.from_pretrained(str(ctx.model_dir), attn_implementation=implementation, dtype=ctx.dtype)
        model = model.to(ctx.device).eval()
        if fp8:
            from ..check import fp8_baseline

            model = fp8_baseline(model)
        ctx.cache[key] = model
    return ctx.cache[key]


HF_IMPLEMENTATIONS = {"hf-eager": "eager", "hf-sdpa": "sdpa", "hf-compile": "sdpa", "hf-flash": "flash_attention_2"}
_SUPPORT_FLAGS = {"sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn"}


def hf_missing(model_dir: Path, implementation: str) -> str | None:
    """Why transformers' model class for ``model_dir`` has no ``implementation`` of attention, or None.

    Read from the class's own flags (``_supports_sdpa``, ``_supports_flash_attn``), as ``from_pretrained``
    decides: MPNet has neither, so its rows say so instead of failing to load."""
    flag = _SUPPORT_FLAGS.get(implementation)
    if flag is None:
        return None
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    config = AutoConfig.from_pretrained(str(model_dir))
    model_class = MODEL_MAPPING[type(config)]
    if getattr(model_class, flag, False):
        return None
    what = "SDPA attention" if implementation == "sdpa" else "flash attention"
    return f"transformers' {model_class.__name__} has no {what} ({flag} is False)"


def reference_implementation(model_dir: Path) -> str:
    """The attention the float32 reference and the low-precision baseline run: SDPA, eager where the model
    has no SDPA (MPNet)."""
    return "sdpa" if hf_missing(model_dir, "sdpa") is None else "eager"


def _hf(implementation: str, compiled: bool = False, fp8: bool = False) -> Callable[[ModelContext], Runner]:
    def load(ctx: ModelContext) -> Runner:
        model = _hf_model(ctx, implementation, fp8)
        # fullgraph: a graph break raises instead of running part of the model eagerly; recompiles past
        # Dynamo's limit raise too (run_e2e sets fail_on_recompile_limit_hit): an hf-compile row is compiled.
        forward = (torch.compile(model, dynamic=False, fullgraph=True, backend=ctx.compile_backend) if compiled
                   else model)

        def prepare(inputs: Inputs):
            batch = inputs.on_device()

            def run():
                with torch.inference_mode():
                    return forward(**batch).last_hidden_state

            return run

        return Runner(prepare, mode="compiled" if compiled else "eager", compiled=compiled)

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
FP8_PEER_NOTE = ("transformers has no FP8 path for encoders: fastenc's FP8 rows compare with the fp16 rows of the "
                 "same case")
QUICK_SKIPS = {"hf-compile": "not run with --quick: torch.compile spends tens of seconds per shape compiling "
                             "(about 40 s on a 2-core CPU); run without --quick, or name it in --providers"}


def _read_config(model_dir: Path):
    from ..config import EncoderConfig

    return EncoderConfig.from_file(model_dir / "config.json")


@contextlib.contextmanager
def _dynamo_settings(recompile_limit: int | None):
    """Recompiles past Dynamo's limit raise (``FailOnRecompileLimitHit``) instead of running eager."""
    from torch import _dynamo

    config = _dynamo.config
    saved = config.recompile_limit, config.fail_on_recompile_limit_hit
    if recompile_limit is not None:
        config.recompile_limit = recompile_limit
    config.fail_on_recompile_limit_hit = True
    try:
        yield
    finally:
        config.recompile_limit, config.fail_on_recompile_limit_hit = saved


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def config_flops(config, lengths: list[int]) -> int:
    """``encoder_flops`` of a loaded checkpoint (an ``EncoderConfig``), read off its family: a gated FFN,
    each layer's window."""
    family = config.family
    windows = tuple(family.layer(i).window for i in range(config.num_hidden_layers))
    spec = family.disentangled
    terms = 0 if spec is None else int(spec.c2p) + int(spec.p2c)
    return encoder_flops(lengths, config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                         gated=family.ffn == "gated", windows=windows, relative_terms=terms,
                         attention=config.num_attention_heads * config.head_dim, kv=config.kv_heads * config.head_dim)


def _reason(exc: BaseException) -> str:
    if type(exc).__name__ == "FailOnRecompileLimitHit":
        from torch import _dynamo

        return (f"torch.compile reached Dynamo's recompile limit ({_dynamo.config.recompile_limit}) and would "
                f"run eager: not timed as a compiled model ({_exc_line(exc)})")
    return _exc_line(exc)


def run_e2e(plan, report: Report, budget) -> None:
    """Every case of ``plan.e2e`` (a ``suite.Plan``), model by model; each provider's output checked against
    hf-sdpa in float32 before it is timed; the results file rewritten after each case."""
    groups: list[tuple[tuple[str, str], list[E2ECase]]] = []
    for case in plan.e2e:
        key = (case.model.name, case.dtype)
        if groups and groups[-1][0] == key:
            groups[-1][1].append(case)
        else:
            groups.append((key, [case]))
    with tempfile.TemporaryDirectory(prefix="fastenc-bench-") as tmp, _dynamo_settings(plan.recompile_limit):
        for _, cases in groups:
            _run_e2e_group(plan, report, budget, cases, Path(tmp))
            report.flush()
            release(plan.device)


def _run_e2e_group(plan, report: Report, budget, cases: list[E2ECase], workdir: Path) -> None:
    from .estimate import e2e_case_seconds, e2e_group_seconds

    device, spec, dtype_name = plan.device, cases[0].model, cases[0].dtype
    dtype, fp8 = compute_dtype(dtype_name), dtype_name == FP8
    providers = list(dict.fromkeys(p for case in cases for p in case.providers))
    built = (workdir / spec.name / "model.safetensors").exists()
    setup = e2e_group_seconds(plan, cases[0], providers, budget.peaks, build=not built)
    refused = budget.refuse(setup + e2e_case_seconds(plan, cases[0], budget.peaks))
    started = time.monotonic()
    if refused:
        for case in cases:
            report.skip("e2e", case.name, "all", dtype_name, refused, model=spec.name)
        return
    report.log(f"e2e {spec.name} {dtype_name}")
    if "hf-compile" in providers:
        from torch import _dynamo

        _dynamo.reset()  # the recompile limit counts transformers' shared code objects across models
    try:
        model_dir = spec.materialize(workdir)
        config = _read_config(model_dir)
        implementation = reference_implementation(model_dir)
        reference_run = _hf(implementation)(ModelContext(model_dir, device, torch.float32, None))
    except Exception as exc:  # noqa: BLE001
        for case in cases:
            report.skip("e2e", case.name, "all", dtype_name, f"the model or its float32 hf-sdpa reference did not "
                        f"load: {_exc_line(exc)}", model=spec.name)
        return
    ctx = ModelContext(model_dir, device, dtype, plan.backend, plan.compile_backend, FP8 if fp8 else None)
    runners: dict[str, Runner] = {}
    for name in providers:
        loader, unavailable = E2E_PROVIDERS[name]
        reason = unavailable(device)
        if reason is None and fp8 and not name.startswith("fastenc"):
            reason = FP8_PEER_NOTE
        if reason is None and name in HF_IMPLEMENTATIONS:
            reason = hf_missing(model_dir, HF_IMPLEMENTATIONS[name])
        if reason is None:
            try:
                runners[name] = loader(ctx)
            except Exception as exc:  # noqa: BLE001
                reason = f"failed to load: {_exc_line(exc)}"
        if reason is not None:
            report.skip("e2e", f"{spec.name}:all", name, dtype_name, reason, model=spec.name)
    try:  # hf-sdpa in the run's dtype: the low-precision baseline of the tolerance rule (shared with the provider);
        # for FP8, transformers in float32 with fastenc's e4m3 roundings
        if fp8:
            baseline_run = _hf(implementation, fp8=True)(ModelContext(model_dir, device, torch.float32, None))
        else:
            baseline_run = _hf(implementation)(ctx) if dtype != torch.float32 else None
    except Exception as exc:  # noqa: BLE001
        for case in cases:
            report.skip("e2e", case.name, "all", dtype_name, f"the {dtype_name} hf-{implementation} baseline did "
                        f"not load: {_exc_line(exc)}", model=spec.name)
        return
    for case in cases:
        estimate = e2e_case_seconds(plan, case, budget.peaks)
        refused = budget.refuse(estimate)
        if refused:
            report.skip("e2e", case.name, "all", dtype_name, refused, model=spec.name)
            continue
        report.scope.add(("e2e", dtype_name, case.name))
        try:
            _run_e2e_case(plan, report, case, config, reference_run, baseline_run,
                          {name: runners[name] for name in case.providers if name in runners}, f"hf-{implementation}")
        except Exception as exc:  # noqa: BLE001 - e.g. a sticky device fault: the case is lost, not the run
            report.skip("e2e", case.name, "all", dtype_name, f"the case failed: {_exc_line(exc)}", model=spec.name)
        report.case_time("e2e", case.name, dtype_name, estimate + setup, time.monotonic() - started)
        started, setup = time.monotonic(), 0.0  # the group's setup is charged to its first case
        report.flush()
    del runners, ctx, reference_run, baseline_run


def _run_e2e_case(plan, report: Report, case: E2ECase, config, reference_run: Runner, baseline_run: Runner | None,
                  runners: dict[str, Runner], reference: str = E2E_BASELINE) -> None:
    device, shape, dtype_name, model = plan.device, case.shape, case.dtype, case.model.name
    if shape.seq > config.max_length:
        report.skip("e2e", case.name, "all", dtype_name,
                    f"sequence {shape.seq} is over the model's {config.max_length} positions", model=model)
        return
    inputs = Inputs.random(shape, config.vocab_size, config.pad_token_id, device,
                           token_types=config.type_vocab_size > 0)
    mask = inputs.attention_mask.to(device)
    packed_reference = packed_baseline = None
    try:
        with torch.inference_mode():
            reference_out = reference_run.prepare(inputs)().float()  # (batch, seq, hidden) on the device
            baseline_out = baseline_run.prepare(inputs)() if baseline_run else None
            if runners and any(r.packed for r in runners.values()):
                keep = mask.bool()
                packed_reference = reference_out[keep]
                packed_baseline = baseline_out[keep] if baseline_out is not None else None
    except Exception as exc:  # noqa: BLE001
        report.skip("e2e", case.name, "all", dtype_name, f"the {reference} reference failed: {_exc_line(exc)}",
                    model=model)
        return
    fns, extra, graphs_after = {}, {}, {}
    for name, runner in runners.items():
        try:
            fn = runner.prepare(inputs)
            mode = runner.mode_for(inputs)
            graphs = _compiled_graphs() if runner.compiled else 0
            before = settled_reserved(device)
            start = time.perf_counter()
            out = fn()
            _sync(device)
            first_call = time.perf_counter() - start
            if runner.packed:  # (tokens, hidden): compare with the real tokens of the references
                check = device_compare(f"{name} {case.name}", out, packed_reference, packed_baseline)
            else:
                check = device_compare(f"{name} {case.name}", out, reference_out, baseline_out, mask=mask)
            del out
            held = (settled_reserved(device) - before) / 2**20 if device.type == "cuda" else None
        except Exception as exc:  # noqa: BLE001
            report.skip("e2e", case.name, name, dtype_name, _reason(exc), model=model)
            continue
        if not check.ok:  # never time a wrong answer
            report.skip("e2e", case.name, name, dtype_name, f"output check against {reference} (float32 "
                        f"reference) failed: {check.line()}", model=model)
            continue
        fns[name] = fn
        extra[name] = {"mode": mode, "first_call_s": first_call, "held_mib": held}
        if runner.compiled:
            graphs_after[name] = _compiled_graphs()
            extra[name] |= {"compile_backend": plan.compile_backend, "compile_s": first_call,
                            "compiled_graphs": graphs_after[name] - graphs}
    del reference_out, baseline_out
    packed_reference = packed_baseline = None
    timings = time_providers(fns, device, plan.repeats)
    flops = config_flops(config, inputs.lengths)
    tokens = sum(inputs.lengths)
    for name, timing in timings.items():
        if isinstance(timing, Exception):
            report.skip("e2e", case.name, name, dtype_name, f"failed while timed: {_reason(timing)}", model=model)
            continue
        info = extra[name]
        if name in graphs_after and _compiled_graphs() != graphs_after[name]:
            report.skip("e2e", case.name, name, dtype_name, "torch.compile compiled again while being timed: the "
                        "timing mixes compilation and runs", model=model)
            continue
        try:
            peak = memory_peak_mib(fns[name], device)
            mem = None if peak is None else peak + max(info["held_mib"] or 0.0, 0.0)
        except Exception as exc:  # noqa: BLE001 - a row without its memory, never a lost row
            report.log(f"  memory of {name} {case.name} not measured: {_exc_line(exc)}")
            mem = None
        base = {"suite": "e2e", "case": case.name, "provider": name, "dtype": dtype_name, "batch": shape.batch,
                "seq": shape.seq, "model": model, "tokens": tokens, "mem_mib": mem, **info}
        report.add_rates(base, timing, [("tokens/s", tokens), ("TFLOP/s", flops)])
        report.log(f"  {case.name} {dtype_name} {name} ({info['mode']}): {timing.median:.3f} ms "
                   f"({timing.p20:.3f}-{timing.p80:.3f}), {tokens / timing.median * 1e3:,.0f} tokens/s")
    del fns
