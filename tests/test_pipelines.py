"""Pipelines against ``transformers.pipeline`` (question answering against the rule in API.md).

Outputs must have transformers' structure, keys in its order, the same labels, tokens, words and
character offsets, and scores within 1e-4.
"""

from __future__ import annotations

import functools
import json
import pathlib
import sys
import warnings

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import checkpoints as C  # noqa: E402
from task_helpers import compare_outputs, mask_token, task_checkpoint  # noqa: E402

import fastenc  # noqa: E402
from fastenc import Encoder, InputError, LoadError  # noqa: E402
from fastenc.cli import main  # noqa: E402

SCORE_TOL = 1e-4
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
LONG_TEXT = ("John lives in New York and works in London. Mary lives in Paris and works in Berlin; "
             "the quick brown fox jumps over the lazy dog, and the cat sat on the mat with the dog. ") * 5


@functools.cache
def ours(task: str, family: str, head: str, **overrides):
    return fastenc.pipeline(task, task_checkpoint(family, head, **overrides), device="cpu")


@functools.cache
def theirs(task: str, family: str, head: str, **overrides):
    import transformers

    with C.quiet_transformers():
        return transformers.pipeline(task, model=str(task_checkpoint(family, head, **overrides)), device="cpu")


def check(task, family, head, inputs, **kwargs):
    """Run both pipelines on ``inputs`` and compare; returns the largest score difference."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = theirs(task, family, head)(inputs, **kwargs)
    got = ours(task, family, head)(inputs, **kwargs)
    difference = compare_outputs(got, expected)
    assert difference <= SCORE_TOL, difference
    return difference


# ------------------------------------------------------------------------------------------ fill-mask
@pytest.mark.parametrize("family", C.families_with("mlm"))
def test_fill_mask(family):
    mask = mask_token(family)
    check("fill-mask", family, "mlm", f"The capital of France is {mask}.")
    check("fill-mask", family, "mlm", f"The capital of France is {mask}.", top_k=1)
    check("fill-mask", family, "mlm", [f"{mask} world!", f"the {mask} sat on the {mask}.", f"Hello {mask}"], top_k=3)
    check("fill-mask", family, "mlm", [f"a {mask} b"], top_k=2)  # a list of one: transformers unwraps it


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_fill_mask_targets(family):
    targets = ["the", "cat", "zz"] if family == "bert" else ["Ġthe", "Ġcat", "hello"]
    check("fill-mask", family, "mlm", f"The {mask_token(family)} sat on the mat.", targets=targets)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_fill_mask_cleans_up_tokenization_spaces_as_configured(tmp_path, family):
    """``clean_up_tokenization_spaces: true`` (older BERT checkpoints): WordPiece text is cleaned, BPE is not."""
    import shutil

    import transformers

    path = tmp_path / "cleanup"
    shutil.copytree(task_checkpoint(family, "mlm"), path)
    settings = json.loads((path / "tokenizer_config.json").read_text())
    settings["clean_up_tokenization_spaces"] = True
    (path / "tokenizer_config.json").write_text(json.dumps(settings))
    text = f"Hello , world ! I do n't know {mask_token(family)} . It 's fine ?"
    with C.quiet_transformers(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = transformers.pipeline("fill-mask", model=str(path), device="cpu")(text, top_k=3)
    got = fastenc.pipeline("fill-mask", path, device="cpu")(text, top_k=3)
    assert compare_outputs(got, expected) <= SCORE_TOL
    if family == "bert":
        assert ", world!" in got[0]["sequence"]


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_pipelines_with_vocab_files_instead_of_tokenizer_json(family):
    """fastenc builds the tokenizer from vocab.txt / vocab.json + merges.txt; transformers builds its own."""
    mask = mask_token(family)
    for task, head, inputs, kwargs in (
            ("fill-mask", "mlm", [f"The capital of France is {mask}.", f"the {mask} sat on the{mask}."], {}),
            ("token-classification", "token_classification", TOKEN_TEXT, {"aggregation_strategy": "first"})):
        fast, slow = ours(task, family, head, tokenizer="vocab"), theirs(task, family, head, tokenizer="vocab")
        assert not (fast.encoder.path / "tokenizer.json").exists()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert compare_outputs(fast(inputs, **kwargs), slow(inputs, **kwargs)) <= SCORE_TOL


def test_fill_mask_without_a_mask_token():
    with pytest.raises(InputError, match="text 1 has no mask token '\\[MASK\\]'"):
        ours("fill-mask", "bert", "mlm")(["a [MASK]", "no mask here"])


# ----------------------------------------------------------------------------------- classification
CLASSIFY_INPUTS = ["This movie was really good, I loved it.", ["The worst film.", "", "a b c d e f g"],
                   {"text": "The cat sat.", "text_pair": "The dog sat on the mat."}]


@pytest.mark.parametrize("family", C.families_with("sequence_classification"))
def test_text_classification(family):
    for inputs in CLASSIFY_INPUTS:
        for kwargs in ({}, {"top_k": 1}, {"top_k": None}, {"top_k": 2}, {"function_to_apply": "sigmoid"},
                       {"function_to_apply": "none", "top_k": None}):
            check("text-classification", family, "sequence_classification", inputs, **kwargs)


@pytest.mark.parametrize("overrides, function", [({"problem_type": "multi_label_classification"}, "sigmoid"),
                                                 ({"num_labels": 1}, "sigmoid"),
                                                 ({"num_labels": 1, "problem_type": "regression"}, "none")])
def test_text_classification_score_function_from_config(overrides, function):
    fast = ours("text-classification", "electra", "sequence_classification", **overrides)
    slow = theirs("text-classification", "electra", "sequence_classification", **overrides)
    assert fast._function(None) == function
    for inputs in CLASSIFY_INPUTS[:2]:
        for kwargs in ({}, {"top_k": None}):
            assert compare_outputs(fast(inputs, **kwargs), slow(inputs, **kwargs)) <= SCORE_TOL


# ------------------------------------------------------------------------------ token classification
TOKEN_TEXT = "John lives in New York and works for Mapfre, Zürich! xq7 unseen-word"


@pytest.mark.parametrize("family", C.families_with("token_classification"))
def test_token_classification(family):
    for strategy in ("none", "simple", "first", "average", "max"):
        check("token-classification", family, "token_classification", TOKEN_TEXT, aggregation_strategy=strategy,
              ignore_labels=[])
    check("token-classification", family, "token_classification", [TOKEN_TEXT, "", "Paris"])  # ignores "O"
    check("token-classification", family, "token_classification", "Mary works in Berlin.", ignore_labels=["B-PER"],
          aggregation_strategy="simple")


@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("strategy", ["simple", "first", "max"])
def test_token_classification_long_text_in_windows(family, strategy):
    """Texts over the tokenizer's model_max_length: windows overlapping by ``stride`` tokens, merged."""
    fast = ours("token-classification", family, "token_classification")
    assert len(fast.tokenizer.encode(LONG_TEXT).ids) > 2 * fast.max_length  # at least three windows
    check("token-classification", family, "token_classification", LONG_TEXT, aggregation_strategy=strategy,
          stride=24, ignore_labels=[])


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_token_classification_pre_split_words(family):
    words = ["John", "lives", "in", "New", "York", "."]
    check("token-classification", family, "token_classification", words, is_split_into_words=True, ignore_labels=[])
    check("token-classification", family, "token_classification", [words, ["Mary", "sat"]], is_split_into_words=True,
          aggregation_strategy="first", ignore_labels=[])


# -------------------------------------------------------------------------------- question answering
def rule_answers(family, question, context, *, max_seq_len, doc_stride, max_answer_len=15, top_k=1):
    """API.md's rule, computed with transformers' tokenizer and logits, by plain loops."""
    import transformers

    path = task_checkpoint(family, "question_answering")
    with C.quiet_transformers():
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    model = C.hf_model(path, "question_answering")
    encoded = tokenizer(question, context, truncation="only_second", max_length=max_seq_len, stride=doc_stride,
                        return_overflowing_tokens=True, return_offsets_mapping=True, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**{k: encoded[k] for k in tokenizer.model_input_names if k in encoded})
    spans = {}
    for window in range(len(encoded["input_ids"])):
        tokens = [i for i, sequence in enumerate(encoded.sequence_ids(window)) if sequence == 1]
        p_start = torch.softmax(logits.start_logits[window, tokens].double(), 0).tolist()
        p_end = torch.softmax(logits.end_logits[window, tokens].double(), 0).tolist()
        offsets = encoded["offset_mapping"][window].tolist()
        for s in range(len(tokens)):
            for e in range(s, min(s + max_answer_len, len(tokens))):
                span = (offsets[tokens[s]][0], offsets[tokens[e]][1])
                spans[span] = max(spans.get(span, 0.0), p_start[s] * p_end[e])
    best = sorted(spans.items(), key=lambda item: -item[1])[:top_k]
    answers = [{"score": score, "start": start, "end": end, "answer": context[start:end]}
               for (start, end), score in best]
    return answers[0] if top_k == 1 else answers, len(encoded["input_ids"])


@pytest.mark.parametrize("family", C.families_with("question_answering"))
def test_question_answering_rule(family):
    pipe = ours("question-answering", family, "question_answering")
    question, context = "Where does John live?", "John lives in New York and works in London."
    expected, _ = rule_answers(family, question, context, max_seq_len=384, doc_stride=128)
    assert compare_outputs(pipe(question=question, context=context), expected) <= SCORE_TOL
    # a long context in overlapping windows, several answers
    expected, windows = rule_answers(family, question, LONG_TEXT, max_seq_len=48, doc_stride=16, max_answer_len=6,
                                     top_k=3)
    assert windows >= 3
    got = pipe(question=question, context=LONG_TEXT, max_seq_len=48, doc_stride=16, max_answer_len=6, top_k=3)
    assert compare_outputs(got, expected) <= SCORE_TOL
    for answer in got:
        assert 0 < answer["score"] <= 1 and answer["answer"] == LONG_TEXT[answer["start"]:answer["end"]]


def test_question_answering_input_forms():
    pipe = ours("question-answering", "bert", "question_answering")
    one = pipe(question="Who sat?", context="The cat sat on the mat.")
    assert list(one) == ["score", "start", "end", "answer"]
    assert pipe({"question": "Who sat?", "context": "The cat sat on the mat."}) == one
    many = pipe(question=["Who sat?", "Where?"], context=["The cat sat on the mat.", "In Paris."], batch_size=1)
    assert many[0] == one and len(many) == 2
    assert pipe(question="Who sat?", context=["The cat sat on the mat."]) == [one]
    with pytest.raises(InputError, match="2 questions but 1 contexts"):
        pipe(question=["a", "b"], context=["c"])
    with pytest.raises(InputError, match="doc_stride 40 must be less than max_seq_len 40"):
        pipe(question="a", context="b", max_seq_len=40, doc_stride=40)


# ------------------------------------------------------------------------------------------- batching
def test_batches_go_through_the_encoder_in_batches(monkeypatch):
    pipe = fastenc.pipeline("text-classification", task_checkpoint("bert", "sequence_classification"), device="cpu")
    texts = ["a cat", "the dog sat on the mat", "", "hello world", "x y z"]
    one_by_one = [pipe(text, top_k=None) for text in texts]
    calls = []
    forward = pipe.model.forward
    monkeypatch.setattr(pipe.model, "forward", lambda packed: calls.append(len(packed.lengths)) or
                        forward(packed))
    batched = pipe(texts, top_k=None, batch_size=2)
    assert calls == [2, 2, 1]
    assert compare_outputs(batched, one_by_one) <= 1e-6


def test_pipeline_on_an_encoder_and_aliases():
    encoder = Encoder.from_pretrained(task_checkpoint("distilbert", "token_classification"), device="cpu")
    assert fastenc.pipeline("ner", encoder).encoder is encoder
    pipe = fastenc.pipeline("sentiment-analysis", task_checkpoint("bert", "sequence_classification"), device="cpu")
    assert pipe.task == "text-classification"
    with pytest.raises(InputError, match="loading options apply to a path"):
        fastenc.pipeline("ner", encoder, device="cpu")
    with pytest.raises(InputError, match="task 'summarization' is not supported"):
        fastenc.pipeline("summarization", encoder)


def test_pipeline_needs_a_tokenizer(tmp_path):
    path = C.make_checkpoint(tmp_path / "notok", "bert", head="mlm", tokenizer=None)
    with pytest.raises(LoadError, match="needs the checkpoint's tokenizer: .*no tokenizer files"):
        fastenc.pipeline("fill-mask", path, device="cpu")


def test_too_long_input_is_an_input_error():
    pipe = ours("fill-mask", "bert", "mlm")
    with pytest.raises(InputError, match=r"input 0 has \d+ tokens, over the limit of 96"):
        pipe("[MASK] " + "word " * 200)


# ---------------------------------------------------------------------------------------- command line
def _run(capsys, task, *argv):
    code = main(["run", task, "--device", "cpu", *argv])  # compared with ours(): CPU, float32
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines()], err


def test_cli_run(capsys):
    path = str(task_checkpoint("bert", "mlm"))
    code, lines, _ = _run(capsys, "fill-mask", "--model", path, "--top-k", "2", "hello [MASK] world")
    assert code == 0 and lines == [ours("fill-mask", "bert", "mlm")("hello [MASK] world", top_k=2)]
    path = str(task_checkpoint("bert", "sequence_classification"))
    code, lines, _ = _run(capsys, "text-classification", "--model", path, "--top-k", "all", "a b", "c")
    assert code == 0 and lines == ours("text-classification", "bert", "sequence_classification")(["a b", "c"],
                                                                                                  top_k=None)
    path = str(task_checkpoint("bert", "token_classification"))
    code, lines, _ = _run(capsys, "token-classification", "--model", path, "--aggregation-strategy", "simple",
                          TOKEN_TEXT)
    assert code == 0 and lines == [ours("token-classification", "bert", "token_classification")(
        TOKEN_TEXT, aggregation_strategy="simple")]
    path = str(task_checkpoint("bert", "question_answering"))
    code, lines, _ = _run(capsys, "question-answering", "--model", path, "--question", "Who?", "--context", "John sat.")
    assert code == 0 and lines == [ours("question-answering", "bert", "question_answering")(
        question="Who?", context="John sat.")]


def test_cli_run_errors_are_one_line(capsys):
    code, _, err = _run(capsys, "fill-mask", "--model", str(task_checkpoint("bert", None)), "a [MASK]")
    assert code == 2 and err.count("\n") == 1 and "missing tensor(s) 'cls.predictions.transform.dense.weight'" in err
    code, _, err = _run(capsys, "fill-mask", "--model", str(task_checkpoint("bert", "mlm")), "no mask")
    assert code == 2 and err == "fastenc: error: text 0 has no mask token '[MASK]'\n"
    code, _, err = _run(capsys, "text-classification", "--model", str(task_checkpoint("bert", "mlm")))
    assert code == 2 and err.startswith("fastenc: error: no texts for text-classification")
