"""Tiny, perturbed Hugging Face checkpoints on disk, one per supported family, for the tests.

Everything is built offline with ``transformers`` / ``tokenizers`` (nothing is downloaded) and takes
well under a second per checkpoint.  The shapes are deliberately odd and differ per family so that the
suite covers head dims 24, 28, 32 and 40, intermediate sizes that are not powers of two, ELECTRA's
``embedding_size != hidden_size``, ALBERT's shared layer, RoBERTa-style ``pad_token_id = 1`` and both
``gelu`` and ``gelu_new``.

The families after BERT (``NEW_FAMILIES``: MPNet, ModernBERT, NomicBERT, GTE, DeBERTa-v2) are built the
same way; ModernBERT's tiny config has a window of ±8 tokens (``local_attention=16``) so that short test
sequences already span several windows, and three layers (global, local, local). DeBERTa's is v3's
kind (no absolute positions, shared position keys, normalised relative embeddings, c2p and p2c) with an
odd head dim (42 / 2 = 21) and 8 position buckets (distances past ±4 are log-bucketed up to 96), so
every test text reaches past them; its tokenizer is a SentencePiece-style Unigram (transformers'
``DebertaV2Tokenizer``) saved as tokenizer.json.

Main entry points::

    make_checkpoint(path, family, *, head=None, seed=0, tokenizer="json", **overrides) -> Path
    make_sentence_transformer(path, *, pooling="mean", normalize=True, subfolder=False,
                              max_seq_length=None) -> Path
    minilm_with_prompts(minilm_path, directory, *, default=None, include_prompt=True) -> Path
    make_sparse_encoder(path, family, pooling, activation, *, layout, max_active_dims=None, seed=0) -> Path
    make_bge_m3(path, *, seed=0, modules=True, colbert_dim=None) -> Path
    make_colbert(path, family, *, expansion, dense_activation="Tanh", skiplist_tasks=("document",), seed=0) -> Path
    make_dense_sentence_transformer(path, family, *, activation, use_residual=False, normalize=True, seed=0) -> Path
    save_sharded(path, max_shard_size="20KB") -> Path
    rewrite_weights(path, fn) -> Path        (rename / drop / reshape tensors of model.safetensors)
    hf_model(path, head=None, attn_implementation="eager") -> transformers.PreTrainedModel
    hf_last_hidden_state(path, input_ids, attention_mask=None, token_type_ids=None) -> Tensor
    random_batch(config_vocab_size, lengths, *, seed, pad_id=0, cls_id=None, sep_id=None)
        -> (input_ids, attention_mask)
    family_batch(encoder, family, lengths, seed=0) -> (input_ids, attention_mask, token_type_ids | None)
    assert_matches_transformers(encoder, path, ids, mask, types, reference=None) -> Tensor

Notes on transformers v5 that matter for a loader (see also the module-level ``SAVED_TIED_KEYS``):

* tied weights are *not* written: an MLM checkpoint has no ``cls.predictions.decoder.weight`` /
  ``lm_head.decoder.weight`` / ``vocab_projector.weight`` / ``generator_lm_head.weight`` /
  ``predictions.decoder.weight`` tensor (they are the word embeddings), and the decoder bias is written
  once, as ``cls.predictions.bias`` / ``lm_head.bias`` / ``predictions.bias``.
* XLM-RoBERTa and CamemBERT head checkpoints use the prefix ``roberta.`` (their ``base_model_prefix``),
  not ``xlm-roberta.`` / ``camembert.``.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile
import warnings
from typing import Sequence

import torch

__all__ = [
    "FAMILIES",
    "NEW_FAMILIES",
    "ALL_FAMILIES",
    "FAMILY_HEADS",
    "families_with",
    "mask_token",
    "HEADS",
    "FAMILY_DEFAULTS",
    "WORDPIECE_FAMILIES",
    "BPE_FAMILIES",
    "BPE_CORPUS",
    "make_checkpoint",
    "make_sentence_transformer",
    "save_sharded",
    "hf_model",
    "hf_last_hidden_state",
    "random_batch",
    "wordpiece_vocab",
    "bpe_tokenizer",
    "special_ids",
    "tokenizer_size",
    "rewrite_weights",
    "SAVED_TIED_KEYS",
    "head_dim",
    "quiet_transformers",
]

FAMILIES = ("bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra", "albert")
NEW_FAMILIES = ("mpnet", "modernbert", "nomic_bert", "gte", "deberta-v2")
ALL_FAMILIES = FAMILIES + NEW_FAMILIES
HEADS = ("mlm", "sequence_classification", "token_classification", "question_answering", "pretraining")

# The task heads transformers has a model for, per family (NomicBERT and GTE have no QA model).
TASK_HEADS = ("mlm", "sequence_classification", "token_classification", "question_answering")
FAMILY_HEADS = {family: TASK_HEADS for family in ALL_FAMILIES}
FAMILY_HEADS.update({"nomic_bert": TASK_HEADS[:3], "gte": TASK_HEADS[:3]})


def families_with(head: str, families=ALL_FAMILIES) -> tuple[str, ...]:
    return tuple(family for family in families if head in FAMILY_HEADS[family])


WORDPIECE_FAMILIES = ("bert", "distilbert", "electra", "albert", "nomic_bert")
BPE_FAMILIES = ("roberta", "xlm-roberta", "camembert", "gte")
MPNET_FAMILIES = ("mpnet",)  # WordPiece with MPNet's <s> <pad> </s> <unk> <mask> specials
MODERNBERT_FAMILIES = ("modernbert",)  # byte-level BPE with [CLS] [SEP] [PAD] [UNK] [MASK]
DEBERTA_FAMILIES = ("deberta-v2",)  # Unigram (SentencePiece) with [PAD] [CLS] [SEP] [UNK] ... [MASK]

# Config kwargs per family (vocab_size is filled in from the tokenizer).  Head dims:
#   bert 72/3 = 24, albert 96/4 = 24, roberta / xlm-roberta / camembert 64/2 = 32,
#   electra 80/2 = 40, distilbert 120/3 = 40.  Intermediate sizes are multiples of 37.
FAMILY_DEFAULTS: dict[str, dict] = {
    "bert": dict(
        hidden_size=72,
        num_attention_heads=3,
        num_hidden_layers=2,
        intermediate_size=111,  # 37 * 3
        max_position_embeddings=96,
        type_vocab_size=2,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        pad_token_id=0,
    ),
    "roberta": dict(
        hidden_size=64,
        num_attention_heads=2,
        num_hidden_layers=2,
        intermediate_size=148,  # 37 * 4
        max_position_embeddings=100,  # 98 usable positions (pad_token_id + 1 are lost)
        type_vocab_size=1,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    ),
    "xlm-roberta": dict(
        hidden_size=64,
        num_attention_heads=2,
        num_hidden_layers=3,
        intermediate_size=185,  # 37 * 5
        max_position_embeddings=66,  # 64 usable
        type_vocab_size=1,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    ),
    "camembert": dict(
        hidden_size=64,
        num_attention_heads=2,
        num_hidden_layers=2,
        intermediate_size=111,  # 37 * 3
        max_position_embeddings=82,  # 80 usable
        type_vocab_size=1,
        hidden_act="gelu_new",
        layer_norm_eps=1e-5,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    ),
    "distilbert": dict(
        dim=120,
        n_heads=3,
        n_layers=2,
        hidden_dim=259,  # 37 * 7
        max_position_embeddings=128,
        activation="gelu",
        sinusoidal_pos_embds=False,
        pad_token_id=0,
    ),
    "electra": dict(
        embedding_size=48,
        hidden_size=80,
        num_attention_heads=2,
        num_hidden_layers=2,
        intermediate_size=222,  # 37 * 6
        max_position_embeddings=72,
        type_vocab_size=2,
        hidden_act="gelu_new",
        layer_norm_eps=1e-12,
        pad_token_id=0,
    ),
    "albert": dict(
        embedding_size=40,
        hidden_size=96,
        num_attention_heads=4,
        num_hidden_layers=3,
        num_hidden_groups=1,
        inner_group_num=1,
        intermediate_size=185,  # 37 * 5
        max_position_embeddings=112,
        type_vocab_size=2,
        hidden_act="gelu_new",
        layer_norm_eps=1e-12,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    ),
    # The families after BERT. Head dims: mpnet 72/3 = 24, modernbert 80/2 = 40, nomic_bert 96/4 = 24,
    # gte 56/2 = 28 (RoPE needs them even).
    "mpnet": dict(
        hidden_size=72,
        num_attention_heads=3,
        num_hidden_layers=2,
        intermediate_size=111,  # 37 * 3
        max_position_embeddings=100,  # 98 usable (positions start at padding_idx + 1 = 2)
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        relative_attention_num_buckets=32,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    ),
    "modernbert": dict(
        hidden_size=80,
        num_attention_heads=2,
        num_hidden_layers=3,  # global, local, local
        intermediate_size=74,  # 37 * 2; Wi has 148 rows
        max_position_embeddings=128,
        hidden_activation="gelu",
        norm_eps=1e-5,
        local_attention=16,  # a window of ±8 tokens
        global_attn_every_n_layers=3,
        pad_token_id=3,
        bos_token_id=1,
        eos_token_id=2,
        cls_token_id=1,
        sep_token_id=2,
    ),
    "nomic_bert": dict(
        hidden_size=96,
        num_attention_heads=4,
        num_hidden_layers=2,
        intermediate_size=148,  # 37 * 4
        max_position_embeddings=128,
        type_vocab_size=2,
        hidden_act="silu",  # SwiGLU
        layer_norm_eps=1e-12,
        pad_token_id=0,
    ),
    # DeBERTa-v3's kind, head dim 42 / 2 = 21 (odd), 8 buckets: exact within ±4, log-bucketed beyond.
    "deberta-v2": dict(
        hidden_size=42,
        num_attention_heads=2,
        num_hidden_layers=2,
        intermediate_size=111,  # 37 * 3
        max_position_embeddings=96,
        type_vocab_size=0,
        hidden_act="gelu",
        layer_norm_eps=1e-7,
        relative_attention=True,
        position_buckets=8,
        max_relative_positions=-1,
        pos_att_type=["p2c", "c2p"],
        share_att_key=True,
        norm_rel_ebd="layer_norm",
        position_biased_input=False,
        pad_token_id=0,
    ),
    "gte": dict(
        hidden_size=56,
        num_attention_heads=2,
        num_hidden_layers=2,
        intermediate_size=111,  # 37 * 3
        max_position_embeddings=128,
        type_vocab_size=1,
        hidden_act="gelu",  # GeGLU
        layer_norm_eps=1e-12,
        pad_token_id=1,
        hidden_dropout_prob=0.0,
    ),
}

# DistilBERT names its config fields differently; accept the usual names as overrides too.
_DISTILBERT_ALIASES = {
    "hidden_size": "dim",
    "num_attention_heads": "n_heads",
    "num_hidden_layers": "n_layers",
    "intermediate_size": "hidden_dim",
    "hidden_act": "activation",
}

_HEAD_AUTO_CLASS = {
    None: "AutoModel",
    "base": "AutoModel",
    "mlm": "AutoModelForMaskedLM",
    "sequence_classification": "AutoModelForSequenceClassification",
    "token_classification": "AutoModelForTokenClassification",
    "question_answering": "AutoModelForQuestionAnswering",
    "pretraining": "AutoModelForPreTraining",
}

_SEQ_LABELS = ["negative", "neutral", "positive", "mixed", "unknown"]
_TOKEN_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-MISC", "I-MISC"]
_DEFAULT_NUM_LABELS = {"sequence_classification": 3, "token_classification": 5}

# Tensors that transformers v5 does NOT write because they are tied (target -> source).
SAVED_TIED_KEYS = {
    "bert": {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
             "cls.predictions.decoder.bias": "cls.predictions.bias"},
    "roberta": {"lm_head.decoder.weight": "roberta.embeddings.word_embeddings.weight",
                "lm_head.decoder.bias": "lm_head.bias"},
    "distilbert": {"vocab_projector.weight": "distilbert.embeddings.word_embeddings.weight"},
    "electra": {"generator_lm_head.weight": "electra.embeddings.word_embeddings.weight"},
    "albert": {"predictions.decoder.weight": "albert.embeddings.word_embeddings.weight",
               "predictions.decoder.bias": "predictions.bias"},
}
SAVED_TIED_KEYS["xlm-roberta"] = SAVED_TIED_KEYS["roberta"]
SAVED_TIED_KEYS["camembert"] = SAVED_TIED_KEYS["roberta"]
SAVED_TIED_KEYS.update({
    "mpnet": {"lm_head.decoder.weight": "mpnet.embeddings.word_embeddings.weight",
              "lm_head.decoder.bias": "lm_head.bias"},
    "modernbert": {"decoder.weight": "model.embeddings.tok_embeddings.weight"},
    "nomic_bert": {"cls.predictions.decoder.weight": "nomic_bert.embeddings.word_embeddings.weight",
                   "cls.predictions.decoder.bias": "cls.predictions.bias"},
    "gte": {"lm_head.decoder.weight": "gte.embeddings.word_embeddings.weight"},
    "deberta-v2": {"cls.predictions.decoder.weight": "deberta.embeddings.word_embeddings.weight",
                   "cls.predictions.decoder.bias": "cls.predictions.bias"},
})


# --------------------------------------------------------------------------------------------------
# Quietness (only inside our functions; global state is restored on exit)
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' logging and progress bars for the duration of the block."""
    from transformers.utils import logging as tlogging

    old_verbosity = tlogging.get_verbosity()
    bars = tlogging.is_progress_bar_enabled()
    tlogging.set_verbosity_error()
    tlogging.disable_progress_bar()
    hub_bars_disabled = None
    try:
        import huggingface_hub.utils as hub_utils

        hub_bars_disabled = hub_utils.are_progress_bars_disabled()
        hub_utils.disable_progress_bars()
    except Exception:  # pragma: no cover - optional
        hub_utils = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        tlogging.set_verbosity(old_verbosity)
        if bars:
            tlogging.enable_progress_bar()
        if hub_utils is not None and hub_bars_disabled is False:
            hub_utils.enable_progress_bars()


# --------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------

_WP_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_WP_WORDS = """
the a an of and to in is it that was for on are with as he she they we you i be at by this have
from or one had not but what all were when there can your which their who where how why do does
hello world paris france capital city country london england berlin germany cat dog sat mat
good bad great movie film love hate like best worst very really happy sad day night time year
john mary lives works new york man woman people house car book read write question answer
""".split()
_WP_SUFFIXES = ["##s", "##es", "##ed", "##ing", "##ly", "##er", "##est", "##tion", "##ment", "##ness"]
_WP_PUNCT = list(".,!?;:'\"-()/&%$#@*+=[]")


def wordpiece_vocab() -> list[str]:
    """The WordPiece vocabulary (token at index i has id i): [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    digits = [str(d) for d in range(10)]
    vocab: list[str] = []
    for tok in _WP_SPECIALS + _WP_PUNCT + digits + letters + ["##" + c for c in letters + digits]:
        if tok not in vocab:
            vocab.append(tok)
    for tok in _WP_WORDS + _WP_SUFFIXES:
        if tok not in vocab:
            vocab.append(tok)
    return vocab


def _wordpiece_tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    vocab = wordpiece_vocab()
    ids = {t: i for i, t in enumerate(vocab)}
    tok = Tokenizer(WordPiece(ids, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _WP_SPECIALS])
    return tok


BPE_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
BPE_VOCAB_SIZE = 300  # 256 byte symbols + 5 specials + merges
BPE_CORPUS = [
    "Hello world!",
    "Hello, world. Hello again, world.",
    "The capital of France is Paris.",
    "The capital of Germany is Berlin.",
    "The capital of England is London.",
    "Paris is a beautiful city in France.",
    "The cat sat on the mat.",
    "The dog sat on the mat with the cat.",
    "This movie was really good, I loved it.",
    "This movie was really bad, I hated it.",
    "What a great film, the best of the year.",
    "The worst film I have seen this year.",
    "John lives in New York and works in London.",
    "Mary lives in Paris and works in Berlin.",
    "Where does John live? John lives in New York.",
    "Who is the president of the company?",
    "How many people live in the city?",
    "The quick brown fox jumps over the lazy dog.",
    "A question and an answer: the answer is forty two.",
    "They were reading books at night in the house.",
    "We like the people who are happy and kind.",
    "The weather is nice today, the sun is shining.",
    "I think that this is the best thing that happened.",
    "There is a car in front of the house.",
    "She writes a new book every year.",
    "He reads the newspaper in the morning.",
    "Encoders turn sentences into vectors.",
    "Sentence embeddings are useful for search.",
    "The model predicts the masked word in the sentence.",
    "Tokens, words, and sentences: 1, 2, 3, 10, 100.",
]
_BPE_CACHE = None  # (vocab: dict[str, int], merges: list[tuple[str, str]]) trained once per session


def _bpe_vocab_merges():
    global _BPE_CACHE
    if _BPE_CACHE is None:
        from tokenizers import ByteLevelBPETokenizer

        trainer_tok = ByteLevelBPETokenizer(add_prefix_space=False, trim_offsets=True)
        trainer_tok.train_from_iterator(
            BPE_CORPUS * 3,
            vocab_size=BPE_VOCAB_SIZE,
            min_frequency=2,
            special_tokens=BPE_SPECIALS,
            show_progress=False,
        )
        data = json.loads(trainer_tok._tokenizer.to_str())
        vocab = dict(data["model"]["vocab"])
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in data["model"]["merges"]]
        for i, t in enumerate(BPE_SPECIALS):
            assert vocab[t] == i, (t, vocab[t])
        _BPE_CACHE = (vocab, merges)
    vocab, merges = _BPE_CACHE
    return dict(vocab), list(merges)


def bpe_tokenizer():
    """A fresh RoBERTa-style byte-level BPE ``tokenizers.Tokenizer`` (training is cached)."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    vocab, merges = _bpe_vocab_merges()
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                        end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.RobertaProcessing(
        ("</s>", vocab["</s>"]), ("<s>", vocab["<s>"]), trim_offsets=True, add_prefix_space=False
    )
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False, lstrip=(t == "<mask>")) for t in BPE_SPECIALS]
    )
    return tok


MPNET_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # MPNet's ids 0-3; <mask> is last in real vocabs
MODERNBERT_SPECIALS = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]


def _mpnet_tokenizer():
    """MPNet's tokenizer (transformers' MPNetConverter): BERT normalisation and WordPiece, ``<s> A </s>``
    and ``<s> A </s> </s> B </s>``."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    vocab = MPNET_SPECIALS + [t for t in wordpiece_vocab() if t not in _WP_SPECIALS]
    ids = {t: i for i, t in enumerate(vocab)}
    tok = Tokenizer(WordPiece(ids, unk_token="<unk>", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                                lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0 </s>:0", pair="<s>:0 $A:0 </s>:0 </s>:0 $B:1 </s>:1",
        special_tokens=[("<s>", ids["<s>"]), ("</s>", ids["</s>"])],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False, lstrip=t == "<mask>")
                            for t in MPNET_SPECIALS])
    return tok


def _modernbert_tokenizer():
    """ModernBERT's kind of tokenizer: byte-level BPE, ``[CLS] A [SEP]`` (its tokenizer.json's template)."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    vocab, merges = _bpe_vocab_merges()
    for old, new in zip(BPE_SPECIALS, MODERNBERT_SPECIALS):  # the same ids 0-4, ModernBERT's names
        vocab[new] = vocab.pop(old)
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                        end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False, lstrip=t == "[MASK]")
                            for t in MODERNBERT_SPECIALS])
    return tok


DEBERTA_SPECIALS = ["[PAD]", "[CLS]", "[SEP]", "[UNK]"]  # ids 0-3, [MASK] last, as in DeBERTa-v3's vocabulary


def deberta_vocab() -> list[tuple[str, float]]:
    """A small Unigram vocabulary, (piece, log-probability): words with SentencePiece's "▁", letters (both
    cases), digits, punctuation, a few suffixes."""
    pieces = ["▁" + word for word in _WP_WORDS]
    for ch in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789":
        pieces += ["▁" + ch, ch]
    pieces += _WP_PUNCT + ["▁" + p for p in ".,!?"] + ["▁", "s", "es", "ed", "ing", "ly", "er", "tion"]
    unique = list(dict.fromkeys(pieces))
    scores = [-2.0 - 0.1 * len(p) if p.startswith("▁") else -4.0 - 0.3 * len(p) for p in unique]
    return [(t, 0.0) for t in DEBERTA_SPECIALS] + list(zip(unique, scores)) + [("[MASK]", 0.0)]


def _deberta_tokenizer(path: pathlib.Path, max_positions: int) -> None:
    """DeBERTa-v3's kind of tokenizer, built by transformers' own ``DebertaV2Tokenizer`` (Unigram, Metaspace,
    ``[CLS] A [SEP] B [SEP]`` with token types), saved as tokenizer.json + tokenizer_config.json."""
    from transformers import DebertaV2Tokenizer

    with quiet_transformers():
        tok = DebertaV2Tokenizer(vocab=deberta_vocab(), do_lower_case=False, model_max_length=max_positions)
        tok.save_pretrained(str(path))


def tokenizer_size(family: str) -> int:
    if family in WORDPIECE_FAMILIES:
        return len(wordpiece_vocab())
    if family in MPNET_FAMILIES:
        return len(MPNET_SPECIALS) + len([t for t in wordpiece_vocab() if t not in _WP_SPECIALS])
    if family in BPE_FAMILIES or family in MODERNBERT_FAMILIES:
        return len(_bpe_vocab_merges()[0])
    if family in DEBERTA_FAMILIES:
        return len(deberta_vocab())
    raise ValueError(f"unknown family {family!r}; expected one of {ALL_FAMILIES}")


def special_ids(family: str) -> dict[str, int]:
    """Ids of pad / unk / cls / sep / mask for the family's tokenizer."""
    if family in WORDPIECE_FAMILIES:
        return {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    if family in BPE_FAMILIES or family in MPNET_FAMILIES:
        return {"cls": 0, "pad": 1, "sep": 2, "unk": 3, "mask": 4}
    if family in MODERNBERT_FAMILIES:
        return {"unk": 0, "cls": 1, "sep": 2, "pad": 3, "mask": 4}
    if family in DEBERTA_FAMILIES:
        return {"pad": 0, "cls": 1, "sep": 2, "unk": 3, "mask": len(deberta_vocab()) - 1}
    raise ValueError(f"unknown family {family!r}; expected one of {ALL_FAMILIES}")


def mask_token(family: str) -> str:
    """The mask token of the family's test tokenizer."""
    if family in MODERNBERT_FAMILIES or family in WORDPIECE_FAMILIES or family in DEBERTA_FAMILIES:
        return "[MASK]"
    return "<mask>"


def _added_tokens_decoder(tok) -> dict:
    out = {}
    for idx, at in sorted(tok.get_added_tokens_decoder().items()):
        out[str(idx)] = {
            "content": at.content,
            "lstrip": at.lstrip,
            "normalized": at.normalized,
            "rstrip": at.rstrip,
            "single_word": at.single_word,
            "special": at.special,
        }
    return out


def _write_tokenizer(path: pathlib.Path, family: str, mode: str | None, max_positions: int) -> None:
    if mode is None:
        return
    if mode not in ("json", "vocab"):
        raise ValueError(f"tokenizer must be 'json', 'vocab' or None, not {mode!r}")
    if family in DEBERTA_FAMILIES:
        if mode != "json":
            raise ValueError(f"{family} checkpoints are built with tokenizer.json only")
        _deberta_tokenizer(path, max_positions)
        return
    if family in MPNET_FAMILIES or family in MODERNBERT_FAMILIES:
        pass  # below
    elif family in WORDPIECE_FAMILIES:
        tok = _wordpiece_tokenizer()
        cfg = {
            "tokenizer_class": "DistilBertTokenizer" if family == "distilbert" else "BertTokenizer",
            "do_lower_case": True,
            "tokenize_chinese_chars": True,
            "strip_accents": None,
            "unk_token": "[UNK]",
            "sep_token": "[SEP]",
            "pad_token": "[PAD]",
            "cls_token": "[CLS]",
            "mask_token": "[MASK]",
            "model_max_length": max_positions,
            "clean_up_tokenization_spaces": False,
            "added_tokens_decoder": _added_tokens_decoder(tok),
        }
        if mode == "json":
            tok.save(str(path / "tokenizer.json"))
        else:
            (path / "vocab.txt").write_text("\n".join(wordpiece_vocab()) + "\n", encoding="utf-8")
    else:
        tok = bpe_tokenizer()
        cfg = {
            "tokenizer_class": "RobertaTokenizer",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "sep_token": "</s>",
            "cls_token": "<s>",
            "unk_token": "<unk>",
            "pad_token": "<pad>",
            "mask_token": "<mask>",
            "add_prefix_space": False,
            "trim_offsets": True,
            "errors": "replace",
            "model_max_length": max_positions - 2,
            "clean_up_tokenization_spaces": False,
            "added_tokens_decoder": _added_tokens_decoder(tok),
        }
        if mode == "json":
            tok.save(str(path / "tokenizer.json"))
        else:
            vocab, merges = _bpe_vocab_merges()
            (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
            (path / "merges.txt").write_text(
                "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
            )
    if family in MPNET_FAMILIES or family in MODERNBERT_FAMILIES:
        if mode != "json":
            raise ValueError(f"{family} checkpoints are built with tokenizer.json only")
        mpnet = family in MPNET_FAMILIES
        tok = _mpnet_tokenizer() if mpnet else _modernbert_tokenizer()
        names = MPNET_SPECIALS if mpnet else MODERNBERT_SPECIALS
        cfg = {
            "tokenizer_class": "MPNetTokenizer" if mpnet else "PreTrainedTokenizerFast",
            "model_input_names": ["input_ids", "attention_mask"],
            **{f"{role}_token": names[i] for role, i in
               (("bos", 0), ("pad", 1), ("eos", 2), ("unk", 3), ("mask", 4), ("cls", 0), ("sep", 2))},
            "model_max_length": max_positions - 2 if mpnet else max_positions,
            "clean_up_tokenization_spaces": False,
            "added_tokens_decoder": _added_tokens_decoder(tok),
        }
        if not mpnet:
            special = special_ids(family)
            cfg.update({f"{role}_token": names[special[role]] for role in ("cls", "sep", "pad", "unk", "mask")})
            cfg.pop("bos_token"), cfg.pop("eos_token")
        tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def _config_kwargs(family: str, head: str | None, overrides: dict, with_tokenizer: bool = True) -> dict:
    if family not in FAMILY_DEFAULTS:
        raise ValueError(f"unknown family {family!r}; expected one of {ALL_FAMILIES}")
    kwargs = dict(FAMILY_DEFAULTS[family])
    kwargs["vocab_size"] = tokenizer_size(family)
    overrides = dict(overrides)
    if family == "distilbert":
        overrides = {_DISTILBERT_ALIASES.get(k, k): v for k, v in overrides.items()}
    if with_tokenizer and overrides.get("vocab_size", kwargs["vocab_size"]) < kwargs["vocab_size"]:
        raise ValueError(f"vocab_size={overrides['vocab_size']} is smaller than the {family} tokenizer "
                         f"({kwargs['vocab_size']} tokens); pass tokenizer=None for a smaller vocabulary")
    kwargs.update(overrides)
    if head in ("sequence_classification", "token_classification"):
        labels = _SEQ_LABELS if head == "sequence_classification" else _TOKEN_LABELS
        if "id2label" in kwargs:
            id2label = {int(k): str(v) for k, v in kwargs["id2label"].items()}
        else:
            n = int(kwargs.pop("num_labels", _DEFAULT_NUM_LABELS[head]))
            id2label = {i: (labels[i] if i < len(labels) else f"LABEL_{i}") for i in range(n)}
        kwargs.pop("num_labels", None)
        kwargs["id2label"] = id2label
        kwargs["label2id"] = {v: k for k, v in id2label.items()}
    return kwargs


def _auto_class(head: str | None):
    import transformers

    if head not in _HEAD_AUTO_CLASS:
        raise ValueError(f"unknown head {head!r}; expected None or one of {HEADS}")
    return getattr(transformers, _HEAD_AUTO_CLASS[head])


def _is_layernorm_weight(model: torch.nn.Module, name: str) -> bool:
    mod_name, _, pname = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    return isinstance(mod, torch.nn.LayerNorm) and pname == "weight"


@torch.no_grad()
def _perturb(model: torch.nn.Module, seed: int, scale: float = 0.1) -> None:
    """Add ``scale * randn`` to every (deduplicated, so tied ones stay tied) parameter.

    LayerNorm weights start at 1 and biases at 0, so they become ``1 + 0.1 randn`` and ``0.1 randn``.
    """
    gen = torch.Generator().manual_seed(int(seed) + 12345)
    for name, p in model.named_parameters():  # shared (tied) parameters are yielded once
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
        if _is_layernorm_weight(model, name):
            p.copy_(1.0 + scale * noise)
        else:
            p.add_(scale * noise)


def make_checkpoint(path, family: str, *, head: str | None = None, seed: int = 0, tokenizer: str | None = "json",
                    **overrides) -> pathlib.Path:
    """Write a tiny perturbed checkpoint of ``family`` (with ``head``) to ``path``; return ``path``.

    ``overrides`` update the config kwargs (e.g. ``num_hidden_layers=4``, ``num_labels=2``,
    ``max_position_embeddings=130``; DistilBERT also accepts the BERT names ``hidden_size`` & co.).
    ``tokenizer``: ``"json"`` (tokenizer.json + tokenizer_config.json), ``"vocab"`` (vocab.txt, or
    vocab.json + merges.txt, + tokenizer_config.json) or ``None`` (no tokenizer files).
    """
    import transformers

    _require_transformers_family(family)
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if head == "base":
        head = None
    kwargs = _config_kwargs(family, head, overrides, with_tokenizer=tokenizer is not None)
    with quiet_transformers():
        config = transformers.AutoConfig.for_model(family, **kwargs)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _auto_class(head).from_config(config)
        model.eval()
        _perturb(model, seed)
        _check_tied(model, family, head)
        model.save_pretrained(str(path), safe_serialization=True)
    leftovers = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".ckpt", ".pth")]
    if leftovers or not (path / "model.safetensors").is_file():
        raise RuntimeError(f"unexpected files written by save_pretrained in {path}: {sorted(os.listdir(path))}")
    _write_tokenizer(path, family, tokenizer, int(config.max_position_embeddings))
    return path


def _require_transformers_family(family: str) -> None:
    """Skip the calling test when the installed transformers has no such model (GTE came in 5.18)."""
    import pytest
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if family not in CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {family!r} model to compare with")


def _check_tied(model, family: str, head: str | None) -> None:
    if head not in ("mlm", "pretraining"):
        return
    out = model.get_output_embeddings()
    if out is None:  # e.g. ElectraForPreTraining (discriminator) has no LM head
        return
    if family == "deberta-v2" and getattr(model.config, "legacy", True) is False:
        return  # its "output embeddings" are the head's dense layer: the decoder is the word embeddings, always
    if getattr(model.config, "tie_word_embeddings", True):
        if out.weight is not model.get_input_embeddings().weight:
            raise RuntimeError(f"{family}/{head}: decoder weight is not tied to the word embeddings")


# --------------------------------------------------------------------------------------------------
# Sentence-transformers layout, sharding
# --------------------------------------------------------------------------------------------------

_POOLING_MODES = ("mean", "cls", "max")


def make_sentence_transformer(path, *, pooling: str = "mean", normalize: bool = True, subfolder: bool = False,
                              max_seq_length: int | None = None, family: str = "bert", seed: int = 0,
                              **overrides) -> pathlib.Path:
    """A sentence-transformers model directory: a ``family`` checkpoint + Pooling (+ Normalize).

    The transformer lies at the root (module path ``""``, like current models) or in ``0_Transformer/``
    (``subfolder=True``, like older models).  ``max_seq_length=None`` leaves it out of
    ``sentence_bert_config.json``.
    """
    if pooling not in _POOLING_MODES:
        raise ValueError(f"pooling must be one of {_POOLING_MODES}, not {pooling!r}")
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tdir = path / "0_Transformer" if subfolder else path
    make_checkpoint(tdir, family, seed=seed, tokenizer="json", **overrides)
    hidden = json.loads((tdir / "config.json").read_text())
    hidden = hidden.get("hidden_size", hidden.get("dim"))

    st_cfg: dict = {"do_lower_case": False}
    if max_seq_length is not None:
        st_cfg["max_seq_length"] = int(max_seq_length)
    (tdir / "sentence_bert_config.json").write_text(json.dumps(st_cfg, indent=2) + "\n")

    modules = [{"idx": 0, "name": "0", "path": "0_Transformer" if subfolder else "",
                "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
        (path / "2_Normalize").mkdir(exist_ok=True)
    (path / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")

    (path / "1_Pooling").mkdir(exist_ok=True)
    pool_cfg = {
        "word_embedding_dimension": int(hidden),
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": pooling == "max",
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": False,
        "include_prompt": True,
    }
    (path / "1_Pooling" / "config.json").write_text(json.dumps(pool_cfg, indent=2) + "\n")
    (path / "config_sentence_transformers.json").write_text(
        json.dumps({"prompts": {}, "default_prompt_name": None, "similarity_fn_name": "cosine"}, indent=2) + "\n"
    )
    return path


# ------------------------------------------------------------------------------------------- retrieval
PROMPTS = {"query": "query: ", "passage": "Represent this passage for retrieval: ", "empty": ""}


def minilm_with_prompts(minilm_path, directory: pathlib.Path, *, default: str | None = None,
                        include_prompt: bool = True) -> pathlib.Path:
    """A copy of the bundled MiniLM's directory with ``PROMPTS`` in its config (``default_prompt_name``
    ``default``, the pooling config's ``include_prompt``); weights linked, not copied."""
    source = pathlib.Path(minilm_path)
    directory = pathlib.Path(directory)
    directory.mkdir()
    for item in source.iterdir():
        if item.is_file() and item.name != "config_sentence_transformers.json":
            (directory / item.name).symlink_to(item)
    (directory / "1_Pooling").mkdir()
    pooling = json.loads((source / "1_Pooling" / "config.json").read_text())
    (directory / "1_Pooling" / "config.json").write_text(json.dumps({**pooling, "include_prompt": include_prompt}))
    if (source / "2_Normalize").is_dir():
        (directory / "2_Normalize").mkdir()
    config = {"prompts": PROMPTS, "default_prompt_name": default, "similarity_fn_name": "cosine"}
    (directory / "config_sentence_transformers.json").write_text(json.dumps(config))
    return directory


def make_sparse_encoder(path, family: str, pooling: str, activation: str, *, layout: str,
                        max_active_dims: int | None = None, seed: int = 0) -> pathlib.Path:
    """A tiny masked LM saved as a sentence-transformers SparseEncoder: ``layout="current"`` as
    sentence-transformers 6 writes it (Transformer with transformer_task fill-mask), ``"legacy"`` as
    version 5 did (MLMTransformer)."""
    path = pathlib.Path(path)
    make_checkpoint(path, family, head="mlm", seed=seed)
    transformer = ("sentence_transformers.base.modules.transformer.Transformer" if layout == "current"
                   else "sentence_transformers.sparse_encoder.models.MLMTransformer")
    modules = [{"idx": 0, "name": "0", "path": "", "type": transformer},
               {"idx": 1, "name": "1", "path": "1_SpladePooling",
                "type": "sentence_transformers.sparse_encoder.models.SpladePooling"}]
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_SpladePooling").mkdir()
    (path / "1_SpladePooling" / "config.json").write_text(json.dumps(
        {"pooling_strategy": pooling, "activation_function": activation, "word_embedding_dimension": None}))
    sbert = {"transformer_task": "fill-mask", "modality_config": {"text": {"method": "forward",
             "method_output_name": "logits"}}, "module_output_name": "token_embeddings"} if layout == "current" \
        else {"max_seq_length": 64, "do_lower_case": False}
    (path / "sentence_bert_config.json").write_text(json.dumps(sbert))
    config = {"model_type": "SparseEncoder", "prompts": {"query": "", "document": ""}, "default_prompt_name": None,
              "similarity_fn_name": "dot"}
    if max_active_dims is not None:
        config["max_active_dims"] = max_active_dims
    (path / "config_sentence_transformers.json").write_text(json.dumps(config))
    return path


def _perturbed_linear(n_in: int, n_out: int, seed: int, *, bias_shift: float = 0.0, bias: bool = True):
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        linear = torch.nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        for param in linear.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=gen))
        if bias:
            linear.bias.add_(bias_shift)
    return linear


def make_bge_m3(path, *, seed: int = 0, modules: bool = True, colbert_dim: int | None = None) -> pathlib.Path:
    """A tiny BGE-M3: a 2-layer XLM-R model with ``colbert_linear.pt`` and ``sparse_linear.pt`` saved as
    BAAI/bge-m3 ships them (``torch.save`` of each ``nn.Linear``'s state dict), perturbed; the sparse bias
    is shifted up so that most tokens get a positive lexical weight. ``modules``: also the
    sentence-transformers files BAAI/bge-m3 has (CLS pooling, Normalize)."""
    path = make_checkpoint(path, "xlm-roberta", seed=seed, num_hidden_layers=2)
    hidden = json.loads((path / "config.json").read_text())["hidden_size"]
    torch.save(_perturbed_linear(hidden, colbert_dim or hidden, seed + 1).state_dict(), path / "colbert_linear.pt")
    torch.save(_perturbed_linear(hidden, 1, seed + 2, bias_shift=0.3).state_dict(), path / "sparse_linear.pt")
    if modules:
        (path / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
        (path / "1_Pooling").mkdir()
        (path / "1_Pooling" / "config.json").write_text(json.dumps(
            {"word_embedding_dimension": hidden, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
        (path / "2_Normalize").mkdir()
    return path


def make_colbert(path, family: str, *, expansion: dict | None, dense_activation: str = "Tanh",
                 skiplist_tasks=("document",), query_length: int | None = 14, document_length: int | None = 20,
                 seed: int = 0) -> pathlib.Path:
    """A tiny ColBERT model saved by sentence-transformers as a ``MultiVectorEncoder``: the ``family``
    checkpoint, a perturbed token-level ``Dense`` to 16 dims (``torch.nn.<dense_activation>``), a
    punctuation skiplist for ``skiplist_tasks``, token ``Normalize``; query/document prompts and lengths,
    and ``expansion`` (the Transformer's ``query_expansion``)."""
    import string

    from sentence_transformers import MultiVectorEncoder
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.base.modules.dense import Dense
    from sentence_transformers.multi_vector_encoder.modules import MultiVectorMask

    path = pathlib.Path(path)
    backbone = make_checkpoint(path.with_name(path.name + "-backbone"), family, seed=seed)
    with quiet_transformers(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformer = Transformer(str(backbone), query_length=query_length, document_length=document_length,
                                  query_expansion=expansion)
        hidden = transformer.get_embedding_dimension()
        linear = _perturbed_linear(hidden, 16, seed + 3)
        dense = Dense(hidden, 16, activation_function=getattr(torch.nn, dense_activation)(),
                      init_weight=linear.weight, init_bias=linear.bias, module_input_name="token_embeddings")
        mask = MultiVectorMask(skiplist_words=list(string.punctuation), skiplist_tasks=list(skiplist_tasks))
        model = MultiVectorEncoder(modules=[transformer, dense, mask, Normalize(module_input_name="token_embeddings")],
                                   prompts={"query": "query: ", "document": "passage: "}, device="cpu")
        model.save(str(path))
    shutil.rmtree(backbone)
    return path


def make_dense_sentence_transformer(path, family: str, *, activation: str, use_residual: bool = False,
                                    normalize: bool = True, pooling: str = "mean", seed: int = 0) -> pathlib.Path:
    """A tiny ``SentenceTransformer`` saved by sentence-transformers: the ``family`` checkpoint, Pooling, a
    perturbed ``Dense`` to 24 dims (``torch.nn.<activation>``, ``use_residual``) and a second one back to
    the hidden size, then Normalize."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.base.modules.dense import Dense
    from sentence_transformers.sentence_transformer.modules import Pooling

    path = pathlib.Path(path)
    backbone = make_checkpoint(path.with_name(path.name + "-backbone"), family, seed=seed)
    with quiet_transformers(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformer = Transformer(str(backbone))
        hidden = transformer.get_embedding_dimension()
        layers = []
        for i, (n_in, n_out) in enumerate(((hidden, 24), (24, hidden))):
            linear = _perturbed_linear(n_in, n_out, seed + 5 + i)
            layers.append(Dense(n_in, n_out, activation_function=getattr(torch.nn, activation)(),
                                init_weight=linear.weight, init_bias=linear.bias, use_residual=use_residual))
            if use_residual and n_in != n_out:
                with torch.no_grad():
                    layers[-1].residual.weight.add_(0.1)
        modules = [transformer, Pooling(hidden, pooling_mode=pooling), *layers] + ([Normalize()] if normalize else [])
        SentenceTransformer(modules=modules, device="cpu").save(str(path))
    shutil.rmtree(backbone)
    return path


def _head_from_config(path: pathlib.Path) -> str | None:
    """Which head a checkpoint directory holds, from ``config.json``'s ``architectures``."""
    cfg = json.loads((pathlib.Path(path) / "config.json").read_text())
    arch = (cfg.get("architectures") or [""])[0]
    for suffix, head in (("ForMaskedLM", "mlm"), ("ForSequenceClassification", "sequence_classification"),
                         ("ForTokenClassification", "token_classification"),
                         ("ForQuestionAnswering", "question_answering"), ("ForPreTraining", "pretraining")):
        if arch.endswith(suffix):
            return head
    return None


def save_sharded(path, max_shard_size="20KB") -> pathlib.Path:
    """Re-save the checkpoint in ``path`` as ``model-0000X-of-0000Y.safetensors`` shards + index."""
    import transformers

    path = pathlib.Path(path)
    cfg = json.loads((path / "config.json").read_text())
    arch = (cfg.get("architectures") or [None])[0]
    with quiet_transformers():
        cls = getattr(transformers, arch, None) if arch else None
        if cls is None:
            cls = _auto_class(_head_from_config(path))
        model = cls.from_pretrained(str(path), dtype=torch.float32)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
            del model
            tmp = pathlib.Path(tmp)
            shards = sorted(tmp.glob("model-*-of-*.safetensors"))
            if not shards or not (tmp / "model.safetensors.index.json").is_file():
                raise RuntimeError(f"sharding did not produce shards: {sorted(os.listdir(tmp))}")
            for old in list(path.glob("model*.safetensors")) + list(path.glob("model.safetensors.index.json")):
                old.unlink()
            for f in shards + [tmp / "model.safetensors.index.json"]:
                shutil.move(str(f), str(path / f.name))
    return path


def rewrite_weights(path, fn) -> pathlib.Path:
    """Rewrite ``path/model.safetensors`` tensor by tensor, for loader edge cases.

    ``fn(name, tensor)`` returns ``(new_name, new_tensor)``, or ``None`` to drop the tensor.  E.g.
    add a prefix, rename LayerNorm ``weight``/``bias`` to legacy ``gamma``/``beta``, drop an encoder
    tensor, or change a shape.  The ``{"format": "pt"}`` metadata is kept.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    file = pathlib.Path(path) / "model.safetensors"
    with safe_open(str(file), "pt") as f:
        metadata = f.metadata() or {"format": "pt"}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    out = {}
    for name, tensor in tensors.items():
        res = fn(name, tensor)
        if res is None:
            continue
        new_name, new_tensor = res
        if new_name in out:
            raise ValueError(f"rewrite_weights: duplicate tensor name {new_name!r}")
        out[new_name] = new_tensor.contiguous()
    save_file(out, str(file), metadata=metadata)
    return pathlib.Path(path)


# --------------------------------------------------------------------------------------------------
# transformers reference
# --------------------------------------------------------------------------------------------------


def hf_model(path, head: str | None = None, attn_implementation: str = "eager", *, output_loading_info=False):
    """Load ``path`` with transformers (the Auto class for ``head``), float32, eval mode."""
    with quiet_transformers():
        out = _auto_class(head).from_pretrained(
            str(path), dtype=torch.float32, attn_implementation=attn_implementation,
            output_loading_info=output_loading_info,
        )
    if output_loading_info:
        model, info = out
        return model.eval(), info
    return out.eval()


def _is_pooler_key(key: str) -> bool:
    return key.startswith("pooler.") or ".pooler." in key


_BASE_MODEL_CACHE: dict = {}  # key (dir, attn, file stats) -> loaded AutoModel; small, private


def _files_signature(path: pathlib.Path) -> tuple:
    sig = []
    for f in sorted(path.iterdir()):
        if f.name == "config.json" or (f.name.startswith("model") and f.suffix in (".safetensors", ".json")):
            st = f.stat()
            sig.append((f.name, st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(sig)


def _base_model(path: pathlib.Path, attn_implementation: str):
    key = (str(path.resolve()), attn_implementation, _files_signature(path))
    model = _BASE_MODEL_CACHE.get(key)
    if model is None:
        model, info = hf_model(path, None, attn_implementation, output_loading_info=True)
        missing = sorted(k for k in info.get("missing_keys", []) if not _is_pooler_key(k))
        mismatched = info.get("mismatched_keys", [])
        if missing or mismatched:
            raise RuntimeError(f"AutoModel.from_pretrained({path}) did not load: missing={missing} "
                               f"mismatched={mismatched}")
        if len(_BASE_MODEL_CACHE) >= 8:
            _BASE_MODEL_CACHE.pop(next(iter(_BASE_MODEL_CACHE)))
        _BASE_MODEL_CACHE[key] = model
    return model


def hf_last_hidden_state(path, input_ids, attention_mask=None, token_type_ids=None, *,
                         attn_implementation: str = "eager") -> torch.Tensor:
    """The transformers base model's ``last_hidden_state`` (float32, CPU, no grad) for the inputs.

    Loads ``path`` with ``AutoModel`` (a head checkpoint loads its base weights; only the pooler may
    be missing, anything else missing raises ``RuntimeError``).  The loaded model is cached while the
    checkpoint files are unchanged.
    """
    model = _base_model(pathlib.Path(path), attn_implementation)
    kwargs = {"input_ids": torch.as_tensor(input_ids).cpu().long()}
    if attention_mask is not None:
        kwargs["attention_mask"] = torch.as_tensor(attention_mask).cpu().long()
    if token_type_ids is not None:
        kwargs["token_type_ids"] = torch.as_tensor(token_type_ids).cpu().long()
    with torch.no_grad():
        return model(**kwargs).last_hidden_state.float()


def head_dim(config) -> int:
    hidden = getattr(config, "hidden_size", None) or getattr(config, "dim")
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_heads")
    return hidden // heads


def random_batch(config_vocab_size: int, lengths: Sequence[int], *, seed: int, pad_id: int = 0,
                 cls_id: int | None = None, sep_id: int | None = None, seq_len: int | None = None):
    """Right-padded ``(input_ids, attention_mask)`` (int64) with random ids that avoid ``pad_id``.

    Row ``i`` has ``lengths[i]`` real tokens (0 gives an all-padding row).  With ``cls_id`` the first
    real token is ``cls_id``; with ``sep_id`` the last real token (of rows with >= 2 tokens, or of
    length-1 rows without ``cls_id``) is ``sep_id``.  The padded length is ``seq_len`` or
    ``max(lengths)`` (at least 1).
    """
    lengths = [int(n) for n in lengths]
    if any(n < 0 for n in lengths):
        raise ValueError("lengths must be >= 0")
    seq = int(seq_len) if seq_len is not None else max([1, *lengths])
    if any(n > seq for n in lengths):
        raise ValueError("a length exceeds seq_len")
    if config_vocab_size < 2:
        raise ValueError("vocabulary too small")
    gen = torch.Generator().manual_seed(int(seed))
    # Draw from [0, vocab - 1) and shift ids >= pad_id up by one: uniform over ids != pad_id.
    ids = torch.randint(0, config_vocab_size - 1, (len(lengths), seq), generator=gen, dtype=torch.long)
    ids = ids + (ids >= pad_id).long()
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        if n >= 1 and cls_id is not None:
            ids[i, 0] = cls_id
        if sep_id is not None and (n >= 2 or (n == 1 and cls_id is None)):
            ids[i, n - 1] = sep_id
    ids = ids.masked_fill(mask == 0, pad_id)
    return ids, mask


def family_batch(encoder, family: str, lengths: Sequence[int], seed: int = 0):
    """``random_batch`` for ``encoder``'s checkpoint of ``family`` (its pad, CLS and SEP ids) and random token
    types where the model has more than one: ``(input_ids, attention_mask, token_type_ids or None)``."""
    special = special_ids(family)
    ids, mask = random_batch(encoder.config.vocab_size, lengths, seed=seed, pad_id=encoder.config.pad_token_id,
                             cls_id=special.get("cls"), sep_id=special.get("sep"))
    types = None
    if encoder.config.type_vocab_size > 1:
        generator = torch.Generator().manual_seed(seed + 1)
        types = torch.randint(0, encoder.config.type_vocab_size, ids.shape, generator=generator) * mask
    return ids, mask, types


def assert_matches_transformers(encoder, path, ids, mask, types, reference=None):
    """``encoder``'s float32 last hidden states of the batch against transformers' (``reference``, else
    computed) under the tolerance rule (fastenc/check.py); padded positions exactly 0. Returns them."""
    from fastenc.check import compare

    out = encoder(ids, mask, types)
    if reference is None:
        reference = hf_last_hidden_state(path, ids, mask, types)
    assert out.shape == reference.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    result = compare("last_hidden_state", out, reference, mask=mask)
    assert result.ok, result.line()
    assert (out[mask == 0] == 0).all(), "padded positions must be exactly 0"
    return out
