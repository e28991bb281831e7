"""How vectors are stored at corpus scale: Matryoshka truncation and four precisions.

- ``dim``: keep the first ``dim`` coordinates (Matryoshka representation learning, Kusupati et al.
  2022, arXiv:2205.13147), then L2-normalise again when the vectors were normalised. Models trained
  with a Matryoshka loss lose little; others (all-MiniLM-L6-v2) lose more: measure before relying on it.
- ``float32`` (as computed), ``float16`` (rounded to nearest).
- ``int8``: per-dimension scalar quantisation against calibration ranges ``(2, dim)`` (row 0 the
  minimum, row 1 the maximum of each coordinate over a calibration set), as sentence-transformers'
  ``quantize_embeddings`` defines it, but rounded to nearest and clipped instead of truncated and
  wrapped: ``q = clip(round((x - min) / step) - 128, -128, 127)`` with ``step = (max - min) / 255``;
  ``x ≈ min + (q + 128) * step``. The ranges must be kept with the vectors (the CLI writes them beside).
- ``binary``: one sign bit per coordinate (``x > 0``), packed 8 per byte, most significant bit first
  (``numpy.packbits``): ``uint8`` of width ``ceil(dim / 8)``, sentence-transformers' ``ubinary``.
  Compare codes by Hamming distance.

Everything here works on whole ``(n, dim)`` tensors with elementwise or per-row operations only, so a
vector's code does not depend on the other rows.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .errors import InputError

PRECISIONS = ("float32", "float16", "int8", "binary")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int8": torch.int8, "binary": torch.uint8}


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise InputError(f"precision {precision!r} is not supported; use one of {', '.join(PRECISIONS)}")
    return precision


def check_dim(dim: int | None, hidden_size: int) -> int:
    """The width vectors are cut to: ``dim``, or the model's when ``None``."""
    if dim is None:
        return hidden_size
    if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= hidden_size:
        raise InputError(f"dim must be an int in [1, {hidden_size}] (the model's hidden size), got {dim!r}")
    return dim


def truncate(vectors: torch.Tensor, dim: int, *, normalize: bool) -> torch.Tensor:
    """The first ``dim`` coordinates of ``(n, hidden)`` float32 vectors, re-normalised when ``normalize``."""
    if dim == vectors.shape[-1]:
        return vectors  # nothing cut: the very bits embed() computed
    vectors = vectors[..., :dim].contiguous()
    if normalize:  # as torch.nn.functional.normalize
        vectors = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return vectors


def int8_ranges(vectors: torch.Tensor) -> torch.Tensor:
    """Calibration ranges ``(2, dim)``: the minimum and the maximum of each coordinate of ``(n, dim)`` vectors."""
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise InputError("int8 calibration needs at least one vector")
    vectors = vectors.float()
    return torch.stack([vectors.amin(0), vectors.amax(0)])


def check_ranges(ranges, dim: int) -> torch.Tensor:
    """``ranges`` as a float32 ``(2, dim)`` tensor with finite ``min <= max``, or an ``InputError``."""
    try:
        if isinstance(ranges, torch.Tensor):
            ranges = ranges.detach().to("cpu", torch.float32)
        else:
            ranges = torch.from_numpy(np.array(ranges, dtype=np.float32))
    except (TypeError, ValueError) as exc:
        raise InputError(f"int8 calibration ranges cannot be read as numbers ({exc})") from None
    if tuple(ranges.shape) != (2, dim):
        raise InputError(f"int8 calibration ranges must have shape (2, {dim}) (min row, max row), "
                         f"got {tuple(ranges.shape)}")
    if not torch.isfinite(ranges).all() or (ranges[1] < ranges[0]).any():
        raise InputError("int8 calibration ranges must be finite with min <= max in every coordinate")
    return ranges


def quantize_int8(vectors: torch.Tensor, ranges: torch.Tensor) -> torch.Tensor:
    """``(n, dim)`` float vectors -> int8 codes against ``ranges`` (see the module docstring)."""
    low, high = ranges[0], ranges[1]
    step = ((high - low) / 255).clamp_min(torch.finfo(torch.float32).tiny)  # a constant coordinate codes to -128
    codes = torch.round((vectors.float() - low) / step) - 128
    return codes.clamp_(-128, 127).to(torch.int8)


def dequantize_int8(codes: torch.Tensor, ranges: torch.Tensor) -> torch.Tensor:
    """Approximate float32 vectors back from int8 codes."""
    ranges = torch.as_tensor(ranges, dtype=torch.float32)
    return ranges[0] + (codes.float() + 128) * ((ranges[1] - ranges[0]) / 255)


def pack_bits(vectors: torch.Tensor) -> torch.Tensor:
    """``(n, dim)`` -> ``(n, ceil(dim / 8))`` uint8: bit ``x > 0`` per coordinate, most significant first."""
    return torch.from_numpy(np.packbits(vectors.numpy() > 0, axis=-1))


@dataclasses.dataclass
class Storage:
    """What ``embed``/``embed_iter`` do to each window of float32 vectors: cut to ``dim``, then store.

    ``ranges`` (int8 only) are the calibration ranges in use: given by the caller, or taken from the first
    window of vectors the first time ``apply`` runs, then kept for every later window.
    """

    dim: int
    precision: str
    normalize: bool
    ranges: torch.Tensor | None = None

    @classmethod
    def make(cls, dim: int | None, precision: str, calibration, *, hidden_size: int, normalize: bool) -> "Storage":
        dim = check_dim(dim, hidden_size)
        precision = check_precision(precision)
        if calibration is not None and precision != "int8":
            raise InputError(f"calibration ranges apply to precision='int8', not {precision!r}")
        ranges = check_ranges(calibration, dim) if calibration is not None else None
        return cls(dim=dim, precision=precision, normalize=normalize, ranges=ranges)

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.precision]

    @property
    def width(self) -> int:
        """Columns of a stored vector: ``dim``, or ``ceil(dim / 8)`` bytes for ``binary``."""
        return -(-self.dim // 8) if self.precision == "binary" else self.dim

    def apply(self, vectors: torch.Tensor) -> torch.Tensor:
        """``(n, hidden)`` float32 vectors -> ``(n, width)`` in the stored dtype."""
        vectors = truncate(vectors, self.dim, normalize=self.normalize)
        if self.precision == "float32":
            return vectors
        if self.precision == "float16":
            return vectors.to(torch.float16)
        if self.precision == "binary":
            return pack_bits(vectors)
        if self.ranges is None:
            self.ranges = int8_ranges(vectors)
        return quantize_int8(vectors, self.ranges)
