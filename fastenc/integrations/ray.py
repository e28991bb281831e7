"""Ray Data: embed a dataset's text column across actors, each loading the encoder once.

``EmbedBatch`` is a callable class for ``ray.data.Dataset.map_batches`` (Ray builds one per actor, so
the checkpoint loads once per actor, not per batch); ``embed_dataset`` wraps it with the usual
options. Vectors come back as a fixed-size list column (plain Parquet when written), one row per input
row; Ray Data retries a batch whose actor died, so every row still comes out exactly once.

``ray`` is the ``fastenc[ray]`` extra; ``import fastenc`` does not import it, nor does this module
(``map_batches`` takes the class as it is).
"""

from __future__ import annotations

import os

import numpy as np

from ..encoder import Encoder
from ..errors import InputError

ON_ERROR = ("raise", "skip")


class EmbedBatch:
    """``ds.map_batches(EmbedBatch, fn_constructor_kwargs={"model": path}, concurrency=2, batch_format="pyarrow")``.

    Takes a batch as a ``pyarrow.Table``, a ``pandas.DataFrame`` or a dict of numpy arrays; returns the
    same kind with ``output_column`` added: ``encoder.embed(batch[column], **embed_kwargs)``. A null or
    non-string text raises ``InputError`` (``on_error="raise"``) or drops its row (``"skip"``).
    """

    def __init__(self, model: str | os.PathLike | None = None, *, column: str = "text",
                 output_column: str = "embedding", device=None, dtype=None, backend: str | None = None,
                 on_error: str = "raise", **embed_kwargs):
        if on_error not in ON_ERROR:
            raise InputError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
        self.encoder = Encoder.from_pretrained(model, device=device, dtype=dtype, backend=backend)
        self.column, self.output_column, self.on_error = column, output_column, on_error
        self.embed_kwargs = embed_kwargs

    def __call__(self, batch):
        kind = type(batch).__module__.split(".")[0]
        if kind == "pyarrow":
            texts = batch.column(self.column).to_pylist()
        elif kind == "pandas" or isinstance(batch, dict):
            texts = list(batch[self.column])
        else:
            raise TypeError(f"EmbedBatch takes a pyarrow.Table, pandas.DataFrame or dict of arrays, "
                            f"not {type(batch).__name__}")
        keep = [isinstance(text, str) for text in texts]
        if not all(keep):
            if self.on_error == "raise":
                row = keep.index(False)
                raise InputError(f"column {self.column!r}: row {row} of a batch of {len(texts)} is "
                                 f"{type(texts[row]).__name__}, not a string (on_error='skip' drops such rows)")
            texts = [text for text, good in zip(texts, keep) if good]
            batch = _select(batch, kind, np.asarray(keep))
        vectors = self.encoder.embed(texts, progress=False, **self.embed_kwargs).numpy()
        return _with_column(batch, kind, self.output_column, vectors)


def _select(batch, kind: str, mask: np.ndarray):
    if kind == "pyarrow":
        import pyarrow as pa

        return batch.filter(pa.array(mask))
    if kind == "pandas":
        return batch[mask].reset_index(drop=True)
    return {name: np.asarray(values)[mask] for name, values in batch.items()}


def _with_column(batch, kind: str, name: str, vectors: np.ndarray):
    """``batch`` plus ``vectors`` (n, width) as column ``name`` (a fixed-size list in Arrow)."""
    if kind == "pyarrow":
        import pyarrow as pa

        column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
        if name in batch.column_names:
            batch = batch.drop_columns([name])
        return batch.append_column(name, column)
    if kind == "pandas":
        batch = batch.copy()
        batch[name] = list(vectors)
        return batch
    return {**batch, name: vectors}


def embed_dataset(ds, *, column: str = "text", model: str | os.PathLike | None = None,
                  output_column: str = "embedding", concurrency: int = 1, num_gpus: float | None = None,
                  num_cpus: float | None = None, rows_per_batch: int = 1024, device=None, dtype=None,
                  backend: str | None = None, on_error: str = "raise", **embed_kwargs):
    """``ds`` with ``output_column`` added: the vectors of ``column``, by ``concurrency`` actors.

    ``model``: a checkpoint directory every actor can read (``None``: the bundled model, which must be
    installed on every node). ``num_gpus``/``num_cpus``: per actor. ``rows_per_batch``: rows handed to
    an actor at a time (``embed`` then batches them by its token budget). ``embed_kwargs`` go to
    ``Encoder.embed`` (``batch_size``, ``max_length``, ``pooling``, ``normalize``, ``dim``,
    ``precision``, ``calibration``). int8 needs ``calibration`` ranges (``Encoder.calibrate`` on a
    sample): actors that each took their own ranges would code the same vector differently.
    """
    if embed_kwargs.get("precision") == "int8" and embed_kwargs.get("calibration") is None:
        raise InputError("precision='int8' across Ray actors needs calibration= ranges shared by every actor "
                         "(encoder.calibrate(sample_texts))")
    if "calibration" in embed_kwargs and embed_kwargs["calibration"] is not None:
        embed_kwargs["calibration"] = np.asarray(embed_kwargs["calibration"], dtype=np.float32)
    for name, value in (("concurrency", concurrency), ("rows_per_batch", rows_per_batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive int, got {value!r}")
    constructor = dict(model=None if model is None else os.fspath(model), column=column, output_column=output_column,
                       device=device, dtype=dtype, backend=backend, on_error=on_error, **embed_kwargs)
    resources = {key: value for key, value in (("num_gpus", num_gpus), ("num_cpus", num_cpus)) if value is not None}
    from ray.data import ActorPoolStrategy

    return ds.map_batches(EmbedBatch, fn_constructor_kwargs=constructor, batch_format="pyarrow",
                          batch_size=rows_per_batch, compute=ActorPoolStrategy(size=concurrency), **resources)
