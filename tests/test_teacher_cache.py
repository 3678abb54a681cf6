"""The teacher-embedding cache on a tiny random teacher: reuse, identity, corruption and interrupted writes."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from embeddistill.models.teachers import DualEncoderTeacher, EmbeddingCache, TeacherIdentity

TEXTS = [
    "Coral reefs bleach when the water is too warm for too long.",
    "Vitamin D",
    "A study of bone density in older adults who took vitamin D supplements every winter for five years, "
    "measured with dual-energy X-ray absorptiometry at the hip and the spine.",
    "Sorting in Python is stable.",
    "mice",
    "The protein is expressed in brain cells of mice and its gene increases tumor risk.",
    "Blood cells in human patients show decreased expression after treatment.",
]


def _forbid(monkeypatch, teacher: DualEncoderTeacher) -> None:
    """Make any encoding by ``teacher``'s model an error (the cache must answer)."""

    def boom(*args, **kwargs):
        raise AssertionError("the teacher encoded a text that should have come from the cache")

    # The cache's fast path checks its tokens against ``preprocess``; the fallback calls ``encode_<kind>``.
    for method in ("encode_document", "encode_query", "preprocess"):
        monkeypatch.setattr(teacher.model, method, boom)


def _count_calls(monkeypatch, model, method: str) -> list[int]:
    """Record how many texts each ``model.<method>`` (``encode_query`` / ``encode_document``) call encodes.

    The fast path never calls ``encode_<kind>``: it tokenises each chunk once with ``tokenize_chunk(model, texts,
    kind)`` (the Rust tokenizer, checked on a sample against ``preprocess``, or ``preprocess`` itself), so the texts
    it tokenises for that kind are counted too.
    """
    from embeddistill.models import encoding

    kind = method.removeprefix("encode_")
    calls: list[int] = []
    original_encode, original_tokenize = getattr(model, method), encoding.tokenize_chunk

    def counting_encode(texts, *args, **kwargs):
        calls.append(len(texts))
        return original_encode(texts, *args, **kwargs)

    def counting_tokenize(tokenized_model, texts, tokenized_kind, *args, **kwargs):
        if tokenized_model is model and tokenized_kind == kind:
            calls.append(len(texts))
        return original_tokenize(tokenized_model, texts, tokenized_kind, *args, **kwargs)

    monkeypatch.setattr(model, method, counting_encode)
    monkeypatch.setattr(encoding, "tokenize_chunk", counting_tokenize)
    return calls


def _shards(cache: EmbeddingCache) -> list:
    return sorted((cache.dir / "shards").glob("*.npy"))


def test_embeddings_equal_direct_encoding(tiny_teacher_path, cache_dir):
    teacher = DualEncoderTeacher.load(tiny_teacher_path, cache_dir=cache_dir, batch_size=3)
    assert teacher.dimension == 32
    assert teacher.normalized is True
    documents = teacher.embed_documents(TEXTS)
    queries = teacher.embed_queries(TEXTS[:4])
    assert documents.shape == (len(TEXTS), 32) and documents.dtype == np.float32
    direct_documents = teacher.model.encode_document(TEXTS, convert_to_numpy=True, batch_size=len(TEXTS))
    direct_queries = teacher.model.encode_query(TEXTS[:4], convert_to_numpy=True)
    np.testing.assert_allclose(documents, direct_documents, atol=1e-5)
    np.testing.assert_allclose(queries, direct_queries, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(documents, axis=1), 1.0, atol=1e-5)
    # Rows follow the order asked for, duplicates included.
    again = teacher.embed_documents([TEXTS[4], TEXTS[0], TEXTS[4]])
    np.testing.assert_array_equal(again, documents[[4, 0, 4]])


def test_compile_teacher_reaches_the_encoder_from_the_command_line(tiny_teacher_path, cache_dir, monkeypatch):
    import contextlib

    from embeddistill.cli import build_parser
    from embeddistill.config import config_from_args
    from embeddistill.models import encoding
    from embeddistill.pipeline.stages import load_dual_encoder

    compiled = []  # the models compiling was asked for (the compiler itself is tested in test_fast_encode.py)

    def record(model):
        compiled.append(model)
        return contextlib.nullcontext()

    monkeypatch.setattr(encoding, "compiled_transformer", record)
    flags = ["--teacher", tiny_teacher_path, "--dataset", "x", "--compile-teacher", "--cache-dir", str(cache_dir)]
    config = config_from_args(build_parser().parse_args(["distill", *flags]))
    teacher = load_dual_encoder(config, tiny_teacher_path)
    documents = teacher.embed_documents(TEXTS)
    assert compiled and compiled[0] is teacher.model  # every chunk went through it
    plain = DualEncoderTeacher.load(tiny_teacher_path, cache_dir=cache_dir / "plain")
    np.testing.assert_allclose(documents, plain.embed_documents(TEXTS), atol=1e-6)


def test_cache_files_and_second_load_reuses(tiny_teacher_path, cache_dir, monkeypatch):
    first = DualEncoderTeacher.load(tiny_teacher_path, cache_dir=cache_dir)
    documents = first.embed_documents(TEXTS)
    queries = first.embed_queries(TEXTS[:3])
    assert len(first.cache) == len(TEXTS) + 3
    manifest = json.loads((first.cache.dir / "manifest.json").read_text())
    assert manifest["teacher"]["max_seq_length"] == 64
    assert manifest["teacher"]["dimension"] == 32
    assert first.cache.dir.parent == cache_dir
    assert not list(first.cache.dir.rglob("*.tmp"))

    second = DualEncoderTeacher.load(tiny_teacher_path, cache_dir=cache_dir)
    assert second.cache.dir == first.cache.dir
    assert len(second.cache) == len(TEXTS) + 3
    _forbid(monkeypatch, second)
    np.testing.assert_array_equal(second.embed_documents(TEXTS), documents)
    np.testing.assert_array_equal(second.embed_queries(TEXTS[:3]), queries)


def test_query_and_document_entries_are_separate(tiny_teacher_path, cache_dir, monkeypatch):
    teacher = DualEncoderTeacher.load(tiny_teacher_path, cache_dir=cache_dir)
    teacher.embed_documents(TEXTS[:2])
    calls = _count_calls(monkeypatch, teacher.model, "encode_query")
    teacher.embed_queries(TEXTS[:2])
    assert sum(calls) == 2


def test_only_new_texts_are_encoded(tiny_teacher_path, cache_dir, monkeypatch):
    teacher = DualEncoderTeacher.load(tiny_teacher_path, cache_dir=cache_dir)
    teacher.embed_documents(TEXTS[:4])
    calls = _count_calls(monkeypatch, teacher.model, "encode_document")
    teacher.embed_documents(TEXTS + [TEXTS[5]])
    assert sum(calls) == len(TEXTS) - 4


def test_different_max_seq_length_different_cache(tiny_teacher_path, cache_dir, monkeypatch):
    default = DualEncoderTeacher.load(tiny_teacher_path, cache_dir=cache_dir)
    default.embed_documents(TEXTS)
    short = DualEncoderTeacher.load(tiny_teacher_path, cache_dir=cache_dir, max_seq_length=8)
    assert short.cache.identity.max_seq_length == 8
    assert short.cache.dir != default.cache.dir
    assert len(short.cache) == 0
    calls = _count_calls(monkeypatch, short.model, "encode_document")
    truncated = short.embed_documents(TEXTS)
    assert sum(calls) == len(TEXTS)
    # The long text really is embedded differently when truncated to 8 tokens.
    assert not np.allclose(truncated[2], default.embed_documents([TEXTS[2]])[0], atol=1e-4)


def test_manifest_of_another_teacher_is_refused(tiny_teacher_path, cache_dir):
    teacher = DualEncoderTeacher.load(tiny_teacher_path, cache_dir=cache_dir)
    manifest = teacher.cache.dir / "manifest.json"
    stored = json.loads(manifest.read_text())
    stored["teacher"]["weights"] = "0" * 32
    manifest.write_text(json.dumps(stored))
    with pytest.raises(ValueError, match="identity"):
        DualEncoderTeacher.load(tiny_teacher_path, cache_dir=cache_dir)


def _sharded_cache(teacher: DualEncoderTeacher, cache_dir, shard_size: int = 3) -> EmbeddingCache:
    identity = TeacherIdentity.of(teacher.name, teacher.model)
    return EmbeddingCache(cache_dir, identity, shard_size=shard_size)


def test_corrupt_shard_warns_and_is_reencoded(tiny_teacher_path, cache_dir, monkeypatch, caplog):
    teacher = DualEncoderTeacher.load(tiny_teacher_path, cache_dir=cache_dir)
    cache = _sharded_cache(teacher, cache_dir)
    original = cache.embed(teacher.model, TEXTS, "document")
    shards = _shards(cache)
    assert len(shards) == 3  # 7 texts in shards of 3

    victim = shards[1]
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0xFF  # flip bits inside the float data, leaving the file parseable
    victim.write_bytes(bytes(data))
    victim_keys = json.loads(victim.with_suffix(".json").read_text())["keys"]

    with caplog.at_level(logging.WARNING, logger="embeddistill.models.teachers"):
        reloaded = _sharded_cache(teacher, cache_dir)
    assert any("corrupt" in r.getMessage() and victim.stem in r.getMessage() for r in caplog.records)
    assert len(reloaded) == len(TEXTS) - len(victim_keys)
    assert not victim.exists() and not victim.with_suffix(".json").exists()

    calls = _count_calls(monkeypatch, teacher.model, "encode_document")
    again = reloaded.embed(teacher.model, TEXTS, "document")
    assert sum(calls) == len(victim_keys)
    np.testing.assert_allclose(again, original, atol=1e-6)

    monkeypatch.undo()
    final = _sharded_cache(teacher, cache_dir)
    assert len(final) == len(TEXTS)
    np.testing.assert_allclose(final.embed(teacher.model, TEXTS, "document"), original, atol=1e-6)


def test_truncated_shard_file_is_reencoded(tiny_teacher_path, cache_dir, caplog):
    teacher = DualEncoderTeacher.load(tiny_teacher_path, cache_dir=cache_dir)
    original = teacher.embed_documents(TEXTS)
    (shard,) = _shards(teacher.cache)
    shard.write_bytes(shard.read_bytes()[:40])
    with caplog.at_level(logging.WARNING, logger="embeddistill.models.teachers"):
        reloaded = DualEncoderTeacher.load(tiny_teacher_path, cache_dir=cache_dir)
    assert len(reloaded.cache) == 0
    assert any("corrupt" in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(reloaded.embed_documents(TEXTS), original, atol=1e-6)


def test_shard_without_json_is_ignored(tiny_teacher_path, cache_dir, monkeypatch):
    teacher = DualEncoderTeacher.load(tiny_teacher_path, cache_dir=cache_dir)
    cache = _sharded_cache(teacher, cache_dir)
    original = cache.embed(teacher.model, TEXTS[:3], "document")
    shards_dir = cache.dir / "shards"
    # A kill between a shard's .npy and its .json leaves a complete .npy without its .json ...
    orphan = cache.embed(teacher.model, TEXTS[3:6], "document")
    (shards_dir / "00002.json").unlink()
    assert (shards_dir / "00002.npy").exists()
    # ... and a kill while writing can leave a stray, half-written .npy.
    (shards_dir / "00003.npy").write_bytes(b"\x93NUMPY half-written")

    reloaded = _sharded_cache(teacher, cache_dir)
    assert len(reloaded) == 3  # only the first, complete shard counts
    calls = _count_calls(monkeypatch, teacher.model, "encode_document")
    embeddings = reloaded.embed(teacher.model, TEXTS, "document")
    assert sum(calls) == len(TEXTS) - 3
    np.testing.assert_allclose(embeddings[:3], original, atol=1e-6)
    np.testing.assert_allclose(embeddings[3:6], orphan, atol=1e-6)

    monkeypatch.undo()
    final = _sharded_cache(teacher, cache_dir)
    assert len(final) == len(TEXTS)
    np.testing.assert_allclose(final.embed(teacher.model, TEXTS, "document"), embeddings, atol=1e-6)


def test_tiny_teacher_fixture_shape(tiny_teacher_path):
    from embeddistill.models.teachers import load_sentence_transformer

    model = load_sentence_transformer(tiny_teacher_path)
    assert model.max_seq_length == 64
    assert model.get_sentence_embedding_dimension() == 32
    hf_model = model[0].auto_model
    assert hf_model.config.num_hidden_layers == 4 and hf_model.config.hidden_size == 32
    assert hf_model.config.vocab_size == len(model.tokenizer) == 30522
    assert model.tokenizer.tokenize("coral reefs") == ["coral", "reefs"]  # the real WordPiece vocabulary
