"""Chat-template inputs, as sentence-transformers renders them for a model whose Transformer module lists the
``"message"`` modality (``sentence_bert_config.json``'s ``modality_config``; sentence-transformers adds it
for every backbone whose tokenizer has a chat template, e.g. Qwen3-Reranker saved as a ``CrossEncoder``).

Such a model never sees a text as it is: each input becomes a conversation, rendered by the tokenizer's
chat template and tokenized without special tokens (the template holds them):

* a text: one ``user`` message; a ``(query, document)`` pair: a ``query`` and a ``document`` message;
* a prompt: a ``system`` message first (instead of text prepended; its tokens are pooled like the rest);
* ``flat`` messages carry the text as their content, ``structured`` ones ``[{"type": "text", "text": ...}]``
  (``format`` in the modality config; ``auto``: flat for the model types sentence-transformers knows to
  be flat or a template that reads no content list, else structured);
* a row cut to the length limit gets the template's tail back over its last tokens (a causal reranker
  reads the last position; right truncation cuts the tail first). The tail is the longest common token
  suffix of the conversation rendered with two different fillers in place of its contents.

The template is rendered by transformers' own tokenizer (``apply_chat_template``, the Jinja renderer
sentence-transformers calls), so ``transformers`` must be installed for these models; the tokens come
from fastenc's tokenizer, as for any text.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from pathlib import Path

from .errors import FastencError, InputError, LoadError

PAIR_ROLES = ("query", "document")
# sentence-transformers' model types whose templates take flat messages whatever they look like
FLAT_MODEL_TYPES = frozenset({"apertus", "deepseek_v3", "gpt_oss", "minicpm3", "seed_oss"})
# what in a template shows that it reads a message's content as a list of typed parts
STRUCTURED_PATTERNS = ("content[0]", ".type", "'type'", '"type"', "item.type", "message.content[")
SIZE_KEYS = frozenset({"padding", "truncation", "max_length", "return_tensors"})  # tokenizer options, not template
FILLERS = ("0", "1 2 3 4")  # two contents that tokenize differently: what their renders share is the template's
SUFFIX_CACHE = 256  # conversation shapes whose template tail is kept
PROBES = (("alpha", "bravo"), ("charlie", "bravo"), ("alpha", "foxtrot"))  # each varies one role of a pair


class Prompted(str):
    """A text with the prompt that goes before it as a ``system`` message (a chat model's prompt)."""

    system: str

    def __new__(cls, text: str, system: str = "") -> "Prompted":
        out = super().__new__(cls, text)
        out.system = system
        return out

    def __reduce__(self):  # pickled whole (a process worker's texts): the text and its prompt
        return Prompted, (str(self), self.system)


@dataclasses.dataclass(frozen=True)
class ChatSettings:
    """What ``sentence_bert_config.json`` says about the message modality: its ``format`` (``flat``,
    ``structured`` or ``auto``) and the ``chat_template`` keyword arguments of ``processing_kwargs``."""

    message_format: str = "auto"
    template_kwargs: tuple = ()  # sorted (name, value) pairs handed to the template
    restore_suffix: bool = True

    @classmethod
    def read(cls, modality: dict, processing: dict, where: Path) -> "ChatSettings":
        message_format = modality.get("format", "auto") if isinstance(modality, dict) else "auto"
        if message_format not in ("auto", "flat", "structured"):
            raise LoadError(f"{where}: the message modality's format {message_format!r} is not one of auto, flat, "
                            "structured")
        kwargs = processing.get("chat_template") if isinstance(processing, dict) else None
        kwargs = dict(kwargs) if isinstance(kwargs, dict) else {}
        restore = kwargs.pop("restore_suffix", True) is not False
        kwargs = {k: v for k, v in kwargs.items() if k not in SIZE_KEYS}
        return cls(message_format, tuple(sorted(kwargs.items())), restore)


class ChatTemplate:
    """One checkpoint's chat rendering (see the module docstring). ``directory`` holds the tokenizer files
    and the template (``tokenizer_config.json``'s ``chat_template`` or ``chat_template.jinja``)."""

    def __init__(self, directory: Path, settings: ChatSettings, model_type: str):
        self.directory = Path(directory)
        self.settings = settings
        self.model_type = model_type
        self._renderer = None
        self._format: str | None = None
        self._suffixes: dict[str, tuple[int, ...]] = {}
        self._lock = threading.RLock()  # the renderer's: loading it and rendering with it

    # ------------------------------------------------------------------------------------- rendering
    @property
    def renderer(self):
        """transformers' tokenizer of the checkpoint, loaded once, for its ``apply_chat_template``."""
        with self._lock:
            if self._renderer is None:
                try:
                    from transformers import AutoTokenizer
                except ImportError:
                    raise FastencError("this checkpoint formats its inputs with the tokenizer's chat template (the "
                                       "\"message\" modality of sentence_bert_config.json), which fastenc renders "
                                       "with transformers: pip install 'fastenc[hf]'") from None
                renderer = AutoTokenizer.from_pretrained(str(self.directory))
                if not getattr(renderer, "chat_template", None):
                    raise FastencError(f"{self.directory}: sentence_bert_config.json lists the \"message\" modality, "
                                       "but the tokenizer has no chat template")
                self._renderer = renderer
            return self._renderer

    @property
    def message_format(self) -> str:
        """``flat`` or ``structured``, as sentence-transformers decides it."""
        if self._format is None:
            declared = self.settings.message_format
            if declared != "auto":
                self._format = declared
            elif self.model_type in FLAT_MODEL_TYPES:
                self._format = "flat"
            else:
                template = self.renderer.chat_template
                structured = not isinstance(template, str) or any(p in template for p in STRUCTURED_PATTERNS)
                self._format = "structured" if structured else "flat"
        return self._format

    def _message(self, role: str, text: str) -> dict:
        if self.message_format == "flat":
            return {"role": role, "content": text}
        return {"role": role, "content": [{"type": "text", "text": text}]}

    def conversation(self, item) -> list[dict]:
        """The messages of one input: a text (a ``user`` message) or a ``(query, document)`` pair, after a
        ``system`` message with the prompt of a ``Prompted`` text (a pair's is its query's)."""
        if isinstance(item, (tuple, list)):
            if len(item) != 2 or not all(isinstance(part, str) for part in item):
                raise InputError("a chat model takes a text or a (query, document) pair of texts")
            messages = [self._message(role, str(part)) for role, part in zip(PAIR_ROLES, item)]
            first = item[0]
        else:
            messages = [self._message("user", str(item))]
            first = item
        system = getattr(first, "system", "")
        if system:
            messages.insert(0, self._message("system", system))
        return messages

    def render(self, conversations: Sequence[list[dict]]) -> list[str]:
        """Each conversation through the template, as text (its special tokens written out)."""
        if not conversations:
            return []
        with self._lock:  # one renderer, one thread at a time
            rendered = self.renderer.apply_chat_template(list(conversations), tokenize=False,
                                                         **dict(self.settings.template_kwargs))
        return [rendered] if isinstance(rendered, str) else list(rendered)

    def check_pairs(self) -> None:
        """sentence-transformers' check that the template carries both roles of a pair: a template that
        renders only ``system`` / ``user`` / ``assistant`` would score text holding neither."""
        base, query, document = self.render([self.conversation(pair) for pair in PROBES])
        if base == query or base == document:
            missing = "query" if base == query else "document"
            raise FastencError(f"{self.directory}: the chat template does not render the {missing!r} message of a "
                               "(query, document) pair; sentence-transformers refuses such pairs too")

    # --------------------------------------------------------------------------------- the template's tail
    def suffix(self, conversation: list[dict], tokenize) -> tuple[int, ...]:
        """The tokens the template writes after the contents of ``conversation`` (``tokenize``: text -> ids
        without special tokens), cached by the conversation's shape: the longest common token suffix of
        its renders with ``FILLERS`` in place of every non-system content (empty if they never differ)."""
        def skeleton(filler: str) -> list[dict]:
            return [m if m["role"] == "system" else self._message(m["role"], filler) for m in conversation]

        key = repr(skeleton(""))
        with self._lock:  # the cache's eviction and filling, one thread at a time
            if key not in self._suffixes:
                first, second = (tokenize(text) for text in self.render([skeleton(f) for f in FILLERS]))
                count = 0
                for left, right in zip(reversed(first), reversed(second)):
                    if left != right:
                        break
                    count += 1
                if len(self._suffixes) >= SUFFIX_CACHE:  # one entry per system prompt: a caller's prompts grow it
                    self._suffixes.pop(next(iter(self._suffixes)))
                self._suffixes[key] = tuple(first[len(first) - count:]) \
                    if 0 < count < min(len(first), len(second)) else ()
            return self._suffixes[key]
