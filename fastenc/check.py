"""The tolerance rule, and ``fastenc check``: fastenc against ``transformers`` on the same checkpoint.

The rule (FlashAttention's, for a whole model): against a float32 reference, fastenc's largest error
may be at most 3x the error of ``transformers`` run in fastenc's own dtype; in float32 itself the
error must stay within ``FP32_RTOL`` of the output's scale (its largest magnitude).

For an FP8 encoder, "transformers in fastenc's own dtype" is transformers in float32 with the same
quantization applied (``fp8_baseline``): every linear layer of its transformer layers fed e4m3 inputs
(one scale per token) and e4m3 weights (one scale per output channel). fastenc's FP8 path may then err
at most 3x as much as the quantization itself does, which fp16's error alone would not allow.
"""

from __future__ import annotations

import dataclasses

import torch

FP32_RTOL = 1e-4
LOW_PRECISION_FACTOR = 3.0

SAMPLE_TEXTS = (
    "Welcome to NYC",
    "The quick brown fox jumps over the lazy dog.",
    "",
    "Encoders turn text into one contextual vector per token; pooled, they make sentence embeddings.",
    "def add(a, b):\n    return a + b  # code, too",
    "Ünïcödé, emoji 🎉 and 한국어 텍스트",
    "short",
)


@dataclasses.dataclass(frozen=True)
class Comparison:
    name: str
    error: float  # largest |fastenc - reference| over the compared positions
    scale: float  # largest |reference|
    limit: float  # largest error the rule allows

    @property
    def ok(self) -> bool:
        return self.error <= self.limit

    def line(self) -> str:
        verdict = "ok" if self.ok else "FAIL"
        return (f"{self.name}: max abs error {self.error:.3e} (relative {self.error / max(self.scale, 1e-30):.2e}), "
                f"limit {self.limit:.3e} -> {verdict}")


def compare(name: str, ours: torch.Tensor, reference: torch.Tensor, baseline: torch.Tensor | None = None,
            mask: torch.Tensor | None = None) -> Comparison:
    """Apply the tolerance rule. ``baseline`` is the reference model run in our dtype (None in float32)."""
    ours, reference = ours.float().cpu(), reference.float().cpu()
    if mask is not None:
        keep = mask.bool().cpu()
        ours, reference = ours[keep], reference[keep]
        baseline = baseline.float().cpu()[keep] if baseline is not None else None
    if reference.numel() == 0:
        return Comparison(name, 0.0, 0.0, 0.0)
    if not torch.isfinite(ours).all():
        return Comparison(name, float("inf"), float(reference.abs().max()), 0.0)
    error = float((ours - reference).abs().max())
    scale = float(reference.abs().max())
    limit = FP32_RTOL * scale
    if baseline is not None:
        limit = max(limit, LOW_PRECISION_FACTOR * float((baseline.float() - reference).abs().max()))
    return Comparison(name, error, scale, limit)


def fp8_baseline(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` (a float32 transformers model, changed in place) quantized as fastenc's FP8 path quantizes:
    each ``nn.Linear`` inside its transformer layers gets e4m3 weights with one scale per output channel and
    rounds its input to e4m3 with one scale per token (``fastenc.fp8.Fp8Weight``'s rounding), computing in
    float32. Embeddings, norms, attention scores and the heads stay as they are. Returns ``model``.

    The transformer layers are the model's ``nn.ModuleList`` with ``config.num_hidden_layers`` entries
    (ALBERT's: its ``config.num_hidden_groups`` shared layer groups).
    """
    from .errors import InputError
    from .fp8 import Fp8Weight

    config = model.config
    count = getattr(config, "num_hidden_groups", None) or getattr(config, "num_hidden_layers", None)
    layers = next((m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == count), None)
    if layers is None:
        raise InputError(f"{type(model).__name__}: no list of {count} transformer layers to quantize")

    def round_trip(x: torch.Tensor) -> torch.Tensor:  # (..., features) -> the same, each row through e4m3
        return Fp8Weight.quantize(x.reshape(-1, x.shape[-1])).dequantize(x.dtype).reshape(x.shape)

    linears = [m for m in layers.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for linear in linears:
            linear.weight.copy_(round_trip(linear.weight.float()))
            linear.register_forward_pre_hook(lambda module, args: (round_trip(args[0]), *args[1:]))
    return model


def run_check(path, *, device=None, dtype=None, backend=None) -> list[Comparison]:
    """Load ``path`` in fastenc and in transformers and compare their outputs on sample texts."""
    from transformers import AutoModel

    from .encoder import Encoder
    from .pooling import pool

    encoder = Encoder.from_pretrained(path, device=device, dtype=dtype, backend=backend)
    model_dir = encoder.path
    if encoder.tokenizer is not None:
        batch = encoder.tokenize(list(SAMPLE_TEXTS), max_length=min(encoder.config.max_length, 128))
    else:
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, encoder.config.vocab_size, (4, 24), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, 10:] = 0
        mask[2, 1:] = 0
        batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    if not encoder.config.type_vocab_size:
        batch.pop("token_type_ids")
    mask = batch["attention_mask"]

    def hf_model(run_dtype: torch.dtype) -> torch.nn.Module:
        model = AutoModel.from_pretrained(str(model_dir), dtype=run_dtype, attn_implementation="eager")
        return model.to(encoder.device).eval()

    def hf_hidden(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            out = model(**{k: v.to(encoder.device) for k, v in batch.items()}).last_hidden_state
        return out.float().cpu()

    exact = hf_model(torch.float32)
    reference = hf_hidden(exact)
    if encoder.fp8:  # the float32 model quantized in place: its last use
        baseline = hf_hidden(fp8_baseline(exact))
    else:
        baseline = hf_hidden(hf_model(encoder.dtype)) if encoder.dtype != torch.float32 else None
    del exact
    ours = encoder(**batch).float().cpu()
    results = [compare("last_hidden_state", ours, reference, baseline, mask)]
    padded_zero = bool((ours[~mask.bool()] == 0).all())
    results.append(Comparison("padding_is_zero", 0.0 if padded_zero else float("inf"), 0.0, 0.0))

    lengths = mask.sum(1).tolist()
    keep = mask.bool().reshape(-1)

    def pooled(hidden):
        return pool(hidden.reshape(-1, hidden.shape[-1])[keep], lengths, "mean")

    results.append(compare("mean_pooled", pooled(ours), pooled(reference),
                           pooled(baseline) if baseline is not None else None))
    return results
