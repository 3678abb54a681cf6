"""LM query generation on tiny random models built here (no download): batching, caching, resume, filtering."""

from __future__ import annotations

import json
import logging

import pytest

pytest.importorskip("transformers")

from embeddistill.querygen import GeneratedQuery  # noqa: E402
from embeddistill.querygen.lm import (  # noqa: E402
    FEW_SHOT_EXAMPLES,
    LMQueryGenerator,
    build_prompt,
    filter_generated,
    first_line,
)

# fmt: off
WORDS = [
    "the", "a", "of", "and", "in", "is", "what", "why", "how", "does", "cell", "cells", "protein", "gene",
    "genes", "cancer", "tumor", "blood", "brain", "mouse", "mice", "human", "study", "studies", "effect", "effects",
    "treatment", "risk", "disease", "patients", "increase", "decrease", "expression", "document", "query",
    "search", "water", "reef", "coral", "python", "sort", "vitamin", "winter", "bone",
]
# fmt: on

DOCUMENTS = {
    "d1": "The protein is expressed in brain cells of mice and its gene increases tumor risk.",
    "d2": "Blood cells in human patients show decreased expression after treatment.",
    "d3": "A study of cancer patients.",
    "d4": "What does the gene do in the cell?",
    "empty": "   ",
}


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[EOS]", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


@pytest.fixture(scope="module")
def causal_model(tmp_path_factory) -> str:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    tokenizer = _tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=512,
        n_layer=1,
        n_head=2,
        n_embd=32,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def seq2seq_model(tmp_path_factory) -> str:
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    tokenizer = _tokenizer()
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    folder = tmp_path_factory.mktemp("tiny-t5")
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def _generator(model: str, **overrides) -> LMQueryGenerator:
    settings = {"per_document": 2, "max_new_tokens": 6, "batch_size": 3, "device": "cpu", **overrides}
    return LMQueryGenerator(model, **settings)


def _forbid_loading(monkeypatch) -> None:
    def refuse(self):
        raise AssertionError("the model was loaded although every query was cached")

    monkeypatch.setattr(LMQueryGenerator, "_load", refuse)


def test_generates_per_document_queries_with_source_ids(causal_model):
    queries = list(_generator(causal_model).generate(DOCUMENTS, {}, seed=0))

    expected = {f"lm-{doc}-{copy}": doc for doc in ("d1", "d2", "d3", "d4") for copy in (0, 1)}
    assert {q.query_id: q.source_id for q in queries} == expected  # blank documents get none
    assert len(queries) == len(expected)
    assert all(q.generator == "lm" for q in queries)
    assert all("\n" not in q.text and q.text == q.text.strip() for q in queries)
    assert any(q.text for q in queries)  # the random model does produce words


def test_same_seed_same_queries_and_other_seed_differs(causal_model):
    generator = _generator(causal_model)  # one instance: the model is loaded once and its RNG state reset per batch
    first = [q.text for q in generator.generate(DOCUMENTS, {}, seed=3)]
    again = [q.text for q in generator.generate(DOCUMENTS, {}, seed=3)]
    other = [q.text for q in generator.generate(DOCUMENTS, {}, seed=4)]
    assert first == again
    assert first != other


def test_rerun_reads_cache_without_loading_the_model(causal_model, tmp_path, monkeypatch):
    cache = tmp_path / "lm.jsonl"
    first = list(_generator(causal_model, cache_path=cache).generate(DOCUMENTS, {}, seed=0))
    rows = [json.loads(line) for line in cache.read_text().splitlines()]
    assert sorted(rows, key=lambda r: r["_id"]) == sorted((q.to_json() for q in first), key=lambda r: r["_id"])

    _forbid_loading(monkeypatch)
    second = list(_generator(causal_model, cache_path=cache).generate(DOCUMENTS, {}, seed=0))
    assert sorted(second, key=lambda q: q.query_id) == sorted(first, key=lambda q: q.query_id)
    assert len(cache.read_text().splitlines()) == len(first)  # nothing appended


def test_interrupted_run_resumes_to_the_same_queries(causal_model, tmp_path):
    uninterrupted = {q.query_id: q for q in _generator(causal_model).generate(DOCUMENTS, {}, seed=1)}

    cache = tmp_path / "lm.jsonl"
    run = _generator(causal_model, cache_path=cache).generate(DOCUMENTS, {}, seed=1)
    partial = [next(run) for _ in range(3)]  # the first batch (3 rows) is on disk: stop here, as a kill would
    run.close()
    assert len(cache.read_text().splitlines()) == 3

    resumed = list(_generator(causal_model, cache_path=cache).generate(DOCUMENTS, {}, seed=1))
    assert resumed[:3] == partial  # cached rows come first
    assert {q.query_id: q for q in resumed} == uninterrupted
    assert len(cache.read_text().splitlines()) == len(uninterrupted)


def test_time_budget_stops_between_batches_and_a_rerun_completes(causal_model, tmp_path, monkeypatch):
    uninterrupted = {q.query_id: q for q in _generator(causal_model).generate(DOCUMENTS, {}, seed=1)}
    clock = iter(range(0, 1000, 10))  # every reading of the clock is 10 s later than the last
    monkeypatch.setattr("embeddistill.querygen.lm.time.monotonic", lambda: next(clock))

    cache = tmp_path / "lm.jsonl"
    budgeted = list(_generator(causal_model, cache_path=cache, max_seconds=15).generate(DOCUMENTS, {}, seed=1))
    assert len(budgeted) == 3  # start at 0 s; the first batch starts at 10 s, the second would at 20 s > 15 s
    monkeypatch.undo()
    resumed = list(_generator(causal_model, cache_path=cache).generate(DOCUMENTS, {}, seed=1))
    assert {q.query_id: q for q in resumed} == uninterrupted


def test_truncated_last_cache_line_is_dropped_and_regenerated(causal_model, tmp_path, caplog):
    cache = tmp_path / "lm.jsonl"
    first = {q.query_id: q for q in _generator(causal_model, cache_path=cache).generate(DOCUMENTS, {}, seed=0)}
    content = cache.read_bytes()
    cache.write_bytes(content[: len(content) - 9])  # a kill -9 in the middle of the last row

    with caplog.at_level(logging.WARNING, logger="embeddistill.querygen.lm"):
        again = {q.query_id: q for q in _generator(causal_model, cache_path=cache).generate(DOCUMENTS, {}, seed=0)}

    assert "truncated last line" in caplog.text
    assert again == first  # the lost row's batch was generated again, identically
    lines = cache.read_text().splitlines()
    assert len(lines) == len(first) and all(json.loads(line)["_id"] in first for line in lines)


def test_cache_from_other_settings_is_refused(causal_model, tmp_path):
    cache = tmp_path / "lm.jsonl"
    list(_generator(causal_model, cache_path=cache).generate(DOCUMENTS, {}, seed=0))
    with pytest.raises(ValueError, match="temperature"):
        list(_generator(causal_model, cache_path=cache, temperature=1.3).generate(DOCUMENTS, {}, seed=0))
    # batch size only changes how the work is split: resuming with another one is allowed
    assert len(list(_generator(causal_model, cache_path=cache, batch_size=5).generate(DOCUMENTS, {}, seed=0))) == 8


def test_causal_prompt_is_few_shot_and_seq2seq_gets_the_document(causal_model, seq2seq_model, monkeypatch):
    docs = {"d3": DOCUMENTS["d3"]}
    seen: dict[str, list[str]] = {}
    for name, model in (("causal", causal_model), ("seq2seq", seq2seq_model)):
        generator = _generator(model, per_document=1)
        loaded = generator._load()
        tokenizer = loaded.tokenizer
        assert loaded.encoder_decoder == (name == "seq2seq")
        assert tokenizer.padding_side == ("right" if loaded.encoder_decoder else "left")
        inputs: list[str] = []
        real_call = type(tokenizer).__call__

        def recording_call(self, texts, *args, _inputs=inputs, _real=real_call, **kwargs):
            _inputs.extend(texts)
            return _real(self, texts, *args, **kwargs)

        with monkeypatch.context() as patch:
            patch.setattr(type(tokenizer), "__call__", recording_call)
            queries = list(generator.generate(docs, {}, seed=0))
        assert [q.query_id for q in queries] == ["lm-d3-0"]
        seen[name] = inputs

    assert seen["causal"] == [build_prompt(DOCUMENTS["d3"])]
    assert seen["seq2seq"] == [DOCUMENTS["d3"]]


def test_prompt_and_first_line():
    assert build_prompt("one two three").endswith("Document: one two three\nQuery:")
    assert build_prompt("one two three").count("Document:") == len(FEW_SHOT_EXAMPLES) + 1
    assert first_line("  is python sort stable \nDocument: next one") == "is python sort stable"
    assert first_line("\nsomething") == ""


def _q(query_id: str, text: str, source: str = "d1") -> GeneratedQuery:
    return GeneratedQuery(query_id, text, source, "lm")


def test_filter_drops_empty_duplicate_and_prompt_copies():
    documents = {
        "d1": "Statins lower the risk of heart attack in older patients with high cholesterol levels.",
        "d2": "Zinc supplements shorten the common cold by about a day.",
    }
    queries = [
        _q("keep-1", "  do statins prevent heart attacks  "),  # kept, stripped
        _q("empty", "   "),
        _q("dup", "Do statins   PREVENT heart attacks"),  # same text, other case and spacing
        _q("echo-label", "Document: Statins lower the risk"),
        _q("echo-query", "Query: zinc and colds"),
        _q("echo-example", FEW_SHOT_EXAMPLES[1][1].upper()),  # a few-shot example's query
        _q("copy", "statins lower the risk of heart attack in older patients"),  # 10 of 10 words copied
        _q("keep-short", "heart attack risk"),  # a key phrase: too short to count as a copy
        _q("keep-2", "does zinc help a cold", "d2"),
        _q("keep-partial", "lower the risk of heart attack with exercise or diet instead", "d1"),  # 6 of 11 copied
        _q("keep-other-doc", "statins lower the risk of heart attack in older patients", "d2"),  # not its source
        _q("excluded", "zinc for colds", "d2"),
    ]
    kept = filter_generated(queries, documents, exclude=["ZINC for colds"])

    assert [q.query_id for q in kept] == ["keep-1", "keep-short", "keep-2", "keep-partial", "keep-other-doc"]
    assert kept[0].text == "do statins prevent heart attacks"
    assert kept[0].source_id == "d1" and kept[0].generator == "lm"


def test_filter_copy_rule_threshold():
    documents = {"d": "alpha beta gamma delta epsilon zeta eta theta"}
    five_of_six = _q("a", "alpha beta gamma delta epsilon omega", "d")  # 5/6 = 0.83 > 0.8: dropped
    four_of_six = _q("b", "alpha beta gamma delta omega psi", "d")  # 4/6 = 0.67: kept
    gapped = _q("c", "alpha gamma epsilon eta theta zeta", "d")  # all words in the document, no long run
    assert [q.query_id for q in filter_generated([five_of_six, four_of_six, gapped], documents)] == ["b", "c"]


def test_gguf_file_or_folder_is_resolved(tmp_path):
    from embeddistill.querygen.lm import _resolve_model

    (tmp_path / "model-q4.gguf").write_bytes(b"")
    assert _resolve_model(str(tmp_path / "model-q4.gguf")) == (str(tmp_path), "model-q4.gguf")
    assert _resolve_model(str(tmp_path)) == (str(tmp_path), "model-q4.gguf")
    (tmp_path / "model-q8.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="several GGUF files"):
        _resolve_model(str(tmp_path))
    assert _resolve_model("google/gemma-3-270m") == ("google/gemma-3-270m", None)  # a hub name passes through
