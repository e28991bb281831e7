"""Streaming readers and atomic writers for txt / jsonl / parquet: what ``fastenc embed --file`` runs on.

Readers yield one ``Row`` per input row, in order, holding only the current line (or Parquet record
batch) in memory. A row that cannot be embedded — not UTF-8, not a JSON object, no text field, a text
that is not a string, a null — comes out as a ``BadRow`` naming the file and its line (text files,
JSON lines: 1-based, as editors count) or row (Parquet: 0-based index), so the caller decides whether
to stop or skip. A problem with the whole file (missing, unreadable, a column of the wrong type)
raises ``CorpusError``.

Writers write to a temporary file beside the target (``.NAME.XXXX.part``, same directory, so the
final ``os.replace`` is atomic on POSIX) and rename it only in ``commit``; ``abort`` — and any exception
or interruption inside a ``with`` block — removes it. So a failed or interrupted run leaves either the
complete previous file or nothing, never a truncated file that looks complete. int8 vectors get their
calibration ranges written beside them, as ``NAME.ranges.json``, in the same way.

Multi-vector (ColBERT) outputs, one ``(n_i, width)`` matrix per text (``multivector=True``): Parquet holds
them in a list-of-vectors column (``list<fixed_size_list<dtype, width>>``); JSON lines a list of vectors per
line; ``.npy`` the texts' vectors one after another, ``(total_vectors, width)``, with each text's vector
count in ``NAME.lengths.npy`` beside it (int64): the packed form ``fastenc.maxsim(query, vectors,
lengths=lengths)`` scores in place.

``pyarrow`` (the ``parquet`` extra) is imported only when a Parquet file is read or written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np
import torch

from .errors import FastencError

INPUT_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
OUTPUT_FORMATS = (".npy", ".jsonl", ".parquet")
_INT64 = (-(2**63), 2**63 - 1)


class CorpusError(FastencError):
    """A corpus file or an output that cannot be used as asked (one line, names the file)."""


class BadRow(CorpusError):
    """One input row that cannot be embedded; ``location`` is ``file:line`` or ``file: row N``."""

    def __init__(self, location: str, problem: str):
        super().__init__(f"{location}: {problem}")
        self.location = location
        self.problem = problem


@dataclasses.dataclass(frozen=True)
class Row:
    location: str  # "corpus.jsonl:17" or "corpus.parquet: row 16"
    text: str
    id: object = None  # the --id-field value (str or int), None without one


def input_format(path: str) -> str:
    """``txt``, ``jsonl`` or ``parquet``, from the file's suffix (anything else, and ``-``, is text lines)."""
    return "txt" if path == "-" else INPUT_FORMATS.get(Path(path).suffix.lower(), "txt")


def read_rows(path: str, *, text_field: str = "text", id_field: str | None = None,
              batch_rows: int = 4096) -> Iterator[Row | BadRow]:
    """The rows of a corpus file in order (``-``: standard input, text lines)."""
    fmt = input_format(path)
    if fmt == "txt" and id_field is not None:
        raise CorpusError(f"{path}: --id-field needs a .jsonl or .parquet file (a text file has only lines)")
    if fmt == "parquet":
        return _parquet_rows(path, text_field, id_field, batch_rows)
    return _line_rows(path, fmt, text_field, id_field)


def _open_binary(path: str) -> IO[bytes]:
    if path == "-":
        # A reader of its own on fd 0, not sys.stdin.buffer: the read-ahead thread may be blocked in it when
        # the run is interrupted, and at shutdown Python takes sys.stdin.buffer's lock (a fatal error then)
        return open(sys.stdin.fileno(), "rb", closefd=False)
    try:
        return open(path, "rb")
    except OSError as exc:
        raise CorpusError(f"cannot read --file {path}: {exc.strerror or exc}") from None


def _line_rows(path: str, fmt: str, text_field: str, id_field: str | None) -> Iterator[Row | BadRow]:
    name = "<stdin>" if path == "-" else path
    handle = _open_binary(path)
    id_type = None  # ids must keep one type (a Parquet column has one)
    try:
        for number, raw in enumerate(_lines(handle, name), start=1):
            location = f"{name}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield BadRow(location, f"not UTF-8 (byte {exc.start} of the line)")
                continue
            if fmt == "txt":
                yield Row(location, line)
                continue
            if not line.strip():
                continue  # a blank line in JSON lines is no row
            row = _json_row(location, line, text_field, id_field, id_type)
            if isinstance(row, Row) and id_field is not None:
                id_type = type(row.id)
            yield row
    finally:
        handle.close()


def _lines(handle: IO[bytes], name: str) -> Iterator[bytes]:
    """Lines without their ``\\n`` / ``\\r\\n``; a read error is a ``CorpusError`` naming the file."""
    try:
        for raw in handle:
            raw = raw[:-1] if raw.endswith(b"\n") else raw
            yield raw[:-1] if raw.endswith(b"\r") else raw
    except OSError as exc:
        raise CorpusError(f"cannot read --file {name}: {exc.strerror or exc}") from None


def _json_row(location: str, line: str, text_field: str, id_field: str | None, id_type) -> Row | BadRow:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        return BadRow(location, f"not valid JSON ({exc.msg} at column {exc.colno})")
    if not isinstance(record, dict):
        return BadRow(location, f"a JSON {type(record).__name__}, not an object")
    if text_field not in record:
        return BadRow(location, f"no field {text_field!r}")
    text = record[text_field]
    if not isinstance(text, str):
        return BadRow(location, f"field {text_field!r} is {_json_type(text)}, not a string")
    if id_field is None:
        return Row(location, text)
    if id_field not in record:
        return BadRow(location, f"no field {id_field!r}")
    key = record[id_field]
    problem = _id_problem(key, id_field, id_type)
    return BadRow(location, problem) if problem else Row(location, text, key)


def _json_type(value) -> str:
    return {type(None): "null", bool: "a boolean", int: "a number", float: "a number", list: "an array",
            dict: "an object"}.get(type(value), type(value).__name__)


def _id_problem(key, id_field: str, id_type) -> str | None:
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        return f"field {id_field!r} is {_json_type(key)}; ids must be strings or integers"
    if isinstance(key, int) and not _INT64[0] <= key <= _INT64[1]:
        return f"field {id_field!r} = {key} does not fit in 64 bits"
    if id_type is not None and type(key) is not id_type:
        return f"field {id_field!r} is a {type(key).__name__}, but earlier ids are {id_type.__name__}s"
    return None


def _import_pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise CorpusError("Parquet files need pyarrow: pip install 'fastenc[parquet]'") from None
    return pyarrow


def _open_parquet(path: str):
    pa = _import_pyarrow()
    try:
        return pa.parquet.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise CorpusError(f"cannot read --file {path} as Parquet: {exc}") from None


def _parquet_rows(path: str, text_field: str, id_field: str | None, batch_rows: int) -> Iterator[Row | BadRow]:
    pa = _import_pyarrow()
    parquet = _open_parquet(path)
    schema = parquet.schema_arrow
    columns = [text_field] + ([id_field] if id_field is not None and id_field != text_field else [])
    for column in columns:
        if schema.get_field_index(column) < 0:
            raise CorpusError(f"{path}: no column {column!r} (columns: {', '.join(schema.names)})")
    text_type = schema.field(text_field).type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)
            or pa.types.is_binary(text_type) or pa.types.is_large_binary(text_type)):
        raise CorpusError(f"{path}: column {text_field!r} is {text_type}, not strings")
    if id_field is not None:
        id_type = schema.field(id_field).type
        if not (pa.types.is_integer(id_type) or pa.types.is_string(id_type) or pa.types.is_large_string(id_type)):
            raise CorpusError(f"{path}: column {id_field!r} is {id_type}; ids must be strings or integers")
    index = 0
    try:
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=columns):
            texts = batch.column(text_field).cast(pa.large_binary()).to_pylist()  # UTF-8 is checked row by row
            keys = batch.column(id_field).to_pylist() if id_field is not None else [None] * len(texts)
            for raw, key in zip(texts, keys):
                location = f"{path}: row {index}"
                index += 1
                if raw is None:
                    yield BadRow(location, f"{text_field!r} is null")
                    continue
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    yield BadRow(location, f"{text_field!r} is not UTF-8 (byte {exc.start})")
                    continue
                if id_field is not None and key is None:
                    yield BadRow(location, f"{id_field!r} is null")
                    continue
                yield Row(location, text, key)
    except (OSError, pa.ArrowException) as exc:
        raise CorpusError(f"cannot read --file {path} as Parquet (after row {index}): {exc}") from None


# ------------------------------------------------------------------------------------------------ writers
class AtomicFile:
    """A temporary file beside ``path``, renamed onto it by ``commit``, removed by ``abort``."""

    def __init__(self, path: Path, mode: str = "wb"):
        self.path = path
        try:
            fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
        except OSError as exc:
            raise CorpusError(f"cannot write --output {path}: {exc.strerror or exc}") from None
        self.temp = Path(temp)
        os.chmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the output gets what open() would give it
        self.handle = os.fdopen(fd, mode, **({"encoding": "utf-8", "newline": "\n"} if "b" not in mode else {}))

    def commit(self) -> None:
        try:
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.handle.close()
            os.replace(self.temp, self.path)
        except OSError as exc:
            self.abort()
            raise CorpusError(f"cannot write --output {self.path}: {exc.strerror or exc}") from None

    def abort(self) -> None:
        try:
            self.handle.close()
        except OSError:
            pass
        self.temp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class VectorWriter:
    """Base of the three writers: ``write(ids, vectors)`` per window, then ``commit`` or ``abort``.

    ``ids`` is a list (one per row) or ``None``; ``vectors`` a CPU tensor ``(n, width)`` in the stored
    dtype, or with ``multivector`` a list of ``(n_i, width)`` tensors, one per row. Use as a context
    manager: leaving the block by an exception aborts.
    """

    suffix = ""

    def __init__(self, path: Path, *, precision: str, dim: int, with_ids: bool, multivector: bool = False):
        self.path = path
        self.precision, self.dim, self.with_ids, self.multivector = precision, dim, with_ids, multivector
        self.rows = 0
        self.ranges: torch.Tensor | None = None  # int8 calibration ranges, written beside at commit

    def write(self, ids: list | None, vectors: torch.Tensor) -> None:
        try:
            self._write(ids, vectors)
        except OSError as exc:
            raise CorpusError(f"cannot write --output {self.path}: {exc.strerror or exc}") from None
        self.rows += len(vectors)

    def commit(self) -> None:
        sidecar = None
        if self.precision == "int8" and self.ranges is not None:
            sidecar = AtomicFile(ranges_path(self.path), "w")
            json.dump(ranges_document(self.ranges), sidecar.handle)
            sidecar.commit()
        try:
            self._commit()
        except BaseException:
            if sidecar is not None:
                sidecar.path.unlink(missing_ok=True)
            raise

    def abort(self) -> None:
        raise NotImplementedError

    def _write(self, ids, vectors) -> None:
        raise NotImplementedError

    def _commit(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            self.abort()


def ranges_path(path: Path) -> Path:
    """Where int8 calibration ranges go beside ``path``: ``NAME.ranges.json``."""
    return path.with_name(path.name + ".ranges.json")


def ranges_document(ranges: torch.Tensor) -> dict:
    return {"precision": "int8", "dim": int(ranges.shape[1]), "min": ranges[0].tolist(), "max": ranges[1].tolist(),
            "dequantize": "x = min + (q + 128) * (max - min) / 255"}


def read_ranges(path: str | Path) -> torch.Tensor:
    """Calibration ranges ``(2, dim)`` from a ``NAME.ranges.json`` file."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
        return torch.tensor([document["min"], document["max"]], dtype=torch.float32)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise CorpusError(f"cannot read calibration ranges from {path}: {exc}") from None


class NpyWriter(VectorWriter):
    """``.npy`` streamed: a fixed-size header (rewritten with the row count at the end), then the rows."""

    suffix = ".npy"
    _HEADER_BYTES = 128  # magic, version, length and the padded dict: room for any 2-D shape

    def __init__(self, path: Path, *, precision: str, dim: int, with_ids: bool, multivector: bool = False):
        super().__init__(path, precision=precision, dim=dim, with_ids=with_ids, multivector=multivector)
        if with_ids:
            raise CorpusError(f"--output {path}: a .npy file holds only the vectors; write ids to .parquet or .jsonl")
        self._dtype = {"float32": np.float32, "float16": np.float16, "int8": np.int8, "binary": np.uint8}[precision]
        self._lengths: list[int] = []  # multi-vector: each text's vector count
        self._file = AtomicFile(path)
        self._file.handle.write(self._header(0))

    def _header(self, rows: int) -> bytes:
        descr = np.lib.format.dtype_to_descr(np.dtype(self._dtype))
        width = -(-self.dim // 8) if self.precision == "binary" else self.dim  # dim may be set after __init__
        text = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': ({rows}, {width}), }}"
        length = self._HEADER_BYTES - 10  # after magic (6), version (2) and the length itself (2)
        return b"\x93NUMPY\x01\x00" + length.to_bytes(2, "little") + text.ljust(length - 1).encode("latin1") + b"\n"

    def _write(self, ids, vectors) -> None:
        if self.multivector:
            self._lengths += [len(v) for v in vectors]
            vectors = torch.cat(list(vectors)) if len(vectors) else torch.zeros(0, 0)
        self._file.handle.write(np.ascontiguousarray(vectors.numpy(), dtype=self._dtype).tobytes())

    def _commit(self) -> None:
        handle = self._file.handle
        lengths = None
        try:
            handle.seek(0)
            handle.write(self._header(sum(self._lengths) if self.multivector else self.rows))
            if self.multivector:
                lengths = AtomicFile(lengths_path(self.path))
                np.save(lengths.handle, np.array(self._lengths, dtype=np.int64))
        except OSError as exc:
            self._file.abort()
            if lengths is not None:
                lengths.abort()
            raise CorpusError(f"cannot write --output {self.path}: {exc.strerror or exc}") from None
        if lengths is not None:
            lengths.commit()
        try:
            self._file.commit()
        except BaseException:
            if lengths is not None:
                lengths.path.unlink(missing_ok=True)
            raise

    def abort(self) -> None:
        self._file.abort()


def lengths_path(path: Path) -> Path:
    """Where a multi-vector ``.npy`` output's per-text vector counts go: ``NAME.lengths.npy`` beside it."""
    return path.with_name(path.stem + ".lengths.npy")


class JsonlWriter(VectorWriter):
    """JSON lines: a vector per line (``[...]``), or ``{"id": ..., "embedding": [...]}`` with ids; with
    ``multivector`` the embedding is a list of vectors (``[[...], ...]``).

    float32 numbers are rounded to 7 decimals (what float32 holds); the others are written exactly.
    ``path=None`` writes to standard output as it goes (nothing to rename there).
    """

    suffix = ".jsonl"

    def __init__(self, path: Path | None, *, precision: str, dim: int, with_ids: bool, multivector: bool = False):
        super().__init__(path, precision=precision, dim=dim, with_ids=with_ids, multivector=multivector)
        self._file = AtomicFile(path, "w") if path is not None else None
        self._handle = self._file.handle if self._file is not None else sys.stdout

    def _write(self, ids, vectors) -> None:
        rows = [v.tolist() for v in vectors] if self.multivector else vectors.tolist()
        if self.precision == "float32":
            rows = [[[round(x, 7) for x in vector] for vector in row] for row in rows] if self.multivector else \
                [[round(x, 7) for x in row] for row in rows]
        if ids is None:
            lines = [json.dumps(row) for row in rows]
        else:
            lines = [json.dumps({"id": key, "embedding": row}, ensure_ascii=False) for key, row in zip(ids, rows)]
        self._handle.write("\n".join(lines) + "\n" if lines else "")

    def _commit(self) -> None:
        if self._file is not None:
            self._file.commit()
        else:
            self._handle.flush()

    def abort(self) -> None:
        if self._file is not None:
            self._file.abort()


class ParquetWriter(VectorWriter):
    """Parquet: an ``id`` column (with ids) and ``embedding``, a fixed-size list of the stored dtype (with
    ``multivector``: a list of them per row).

    The schema metadata ``fastenc`` holds the precision and dim (and the int8 ranges). A row group per
    window; the writer opens at the first window, when the id type is known.
    """

    suffix = ".parquet"

    def __init__(self, path: Path, *, precision: str, dim: int, with_ids: bool, multivector: bool = False):
        super().__init__(path, precision=precision, dim=dim, with_ids=with_ids, multivector=multivector)
        self._pa = _import_pyarrow()
        self._file = AtomicFile(path)
        self._writer = None

    def _table(self, ids, vectors):
        pa = self._pa
        if self.multivector:
            counts = [len(v) for v in vectors]
            flat = torch.cat(list(vectors)) if vectors else torch.zeros(0, self._width(), dtype=_TORCH[self.precision])
            array = np.ascontiguousarray(flat.numpy())
            points = pa.FixedSizeListArray.from_arrays(pa.array(array.reshape(-1)), array.shape[1])
            offsets = pa.array(np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int32))
            columns = {"embedding": pa.ListArray.from_arrays(offsets, points)}
        else:
            array = np.ascontiguousarray(vectors.numpy())
            values = pa.array(array.reshape(-1))
            columns = {"embedding": pa.FixedSizeListArray.from_arrays(values, array.shape[1])}
        if self.with_ids:
            columns = {"id": pa.array(ids, type=pa.int64() if ids and isinstance(ids[0], int) else pa.string()),
                       **columns}
        return pa.table(columns)

    def _write(self, ids, vectors) -> None:
        table = self._table(ids, vectors)
        if self._writer is None:
            meta = {"precision": self.precision, "dim": self.dim, **({"multivector": True} if self.multivector else {})}
            if self.ranges is not None:
                meta["ranges"] = ranges_document(self.ranges)
            schema = table.schema.with_metadata({"fastenc": json.dumps(meta)})
            self._writer = self._pa.parquet.ParquetWriter(self._file.handle, schema)
        try:
            self._writer.write_table(table.cast(self._writer.schema))
        except self._pa.ArrowException as exc:
            raise CorpusError(f"cannot write --output {self.path}: {exc}") from None

    def _commit(self) -> None:
        try:
            if self._writer is None:  # no rows: still a valid, empty file
                empty = [] if self.multivector else torch.zeros(0, self._width(), dtype=_TORCH[self.precision])
                self._write([] if self.with_ids else None, empty)
            self._writer.close()
        except (OSError, self._pa.ArrowException) as exc:
            self._file.abort()
            raise CorpusError(f"cannot write --output {self.path}: {exc}") from None
        self._file.commit()

    def _width(self) -> int:
        return -(-self.dim // 8) if self.precision == "binary" else self.dim

    def abort(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:  # the file is being thrown away
                pass
        self._file.abort()


_TORCH = {"float32": torch.float32, "float16": torch.float16, "int8": torch.int8, "binary": torch.uint8}


def open_writer(path: str | None, *, precision: str, dim: int, with_ids: bool,
                multivector: bool = False) -> VectorWriter:
    """The writer for ``path``'s suffix (``None``: JSON lines on standard output)."""
    if path is None:
        return JsonlWriter(None, precision=precision, dim=dim, with_ids=with_ids, multivector=multivector)
    target = Path(path)
    writers = {w.suffix: w for w in (NpyWriter, JsonlWriter, ParquetWriter)}
    if target.suffix not in writers:
        raise CorpusError(f"--output {path}: the suffix must be one of {', '.join(OUTPUT_FORMATS)}")
    if target.is_dir():
        raise CorpusError(f"cannot write --output {path}: it is a directory")
    return writers[target.suffix](target, precision=precision, dim=dim, with_ids=with_ids, multivector=multivector)

