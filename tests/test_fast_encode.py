"""The fast encoding path (embeddistill.models.encoding) gives SentenceTransformer.encode's embeddings, faster.

Tiny random BERT and MPNet models with the real MiniLM tokenizer, fp32 on the CPU, where both paths are exact up
to float summation order.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embeddistill.models import encoding, tokenization
from embeddistill.models.encoding import batch_bounds, encode, encode_chunks, pieces
from embeddistill.models.kernels import sdpa_attention
from embeddistill.models.teachers import load_sentence_transformer
from embeddistill.models.tokenization import RustTokenizer, preprocess_chunk, rust_tokenizer, tokenize_chunk

TEXTS = [
    "Coral reefs bleach when the water is too warm for too long.",
    "Vitamin D",
    "A study of bone density in older adults who took vitamin D supplements every winter for five years, "
    "measured with dual-energy X-ray absorptiometry at the hip and the spine, " * 3,  # truncated at 64 tokens
    "mice",
    "Vitamin D",  # a duplicate
    "The protein is expressed in brain cells of mice and its gene increases tumor risk.",
    "",
    "Blood cells in human patients show decreased expression after treatment with the new drug.",
    "What lowers blood pressure?",
]
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def tiny_mpnet_path(tmp_path_factory) -> str:
    """A random 2-layer MPNet (relative position bias, eager attention) as a sentence-transformers model."""
    import transformers
    from conftest import _minilm_path, _sentence_transformer_modules
    from sentence_transformers import SentenceTransformer

    Transformer, Pooling, Normalize = _sentence_transformer_modules()
    folder = tmp_path_factory.mktemp("tiny-mpnet")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(_minilm_path()))
    config = transformers.MPNetConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=130,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(3)
    transformers.MPNetModel(config, add_pooling_layer=False).save_pretrained(folder / "hf")
    tokenizer.save_pretrained(folder / "hf")
    modules = [Transformer(str(folder / "hf"), max_seq_length=64), Pooling(32, pooling_mode="mean"), Normalize()]
    SentenceTransformer(modules=modules, device="cpu").save(str(folder / "st"))
    return str(folder / "st")


@pytest.fixture(params=["bert", "mpnet"])
def model(request, tiny_teacher_path, tiny_mpnet_path):
    return load_sentence_transformer(tiny_teacher_path if request.param == "bert" else tiny_mpnet_path).eval()


def _reference(model, texts: list[str], kind: str) -> np.ndarray:
    encode_kind = model.encode_query if kind == "query" else model.encode_document
    return encode_kind(texts, batch_size=4, convert_to_numpy=True, show_progress_bar=False)


@pytest.mark.parametrize("kind", ["document", "query"])
@pytest.mark.parametrize("batch_size", [1, 3, 64])  # token budgets of 64, 192 and 4096 tokens
def test_fast_path_equals_sentence_transformers_encode(model, kind, batch_size):
    expected = _reference(model, TEXTS, kind)
    got = encode(model, TEXTS, kind, batch_size=batch_size, chunk_size=4)
    assert got.shape == expected.shape and got.dtype == np.float32
    assert np.abs(got - expected).max() < TOLERANCE
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(got[1], got[4])  # the duplicate: same row, wherever it was batched


def test_extra_padding_changes_nothing(model, monkeypatch):
    """On CUDA batches are padded to a multiple of 8 tokens; padding is masked, so embeddings stay the same."""
    expected = _reference(model, TEXTS, "document")
    monkeypatch.setattr(encoding, "pad_multiple", lambda device: 8)
    got = encode(model, TEXTS, "document", batch_size=2)
    assert np.abs(got - expected).max() < TOLERANCE


def test_sdpa_mpnet_attention_matches_eager_and_is_undone(tiny_mpnet_path):
    model = load_sentence_transformer(tiny_mpnet_path).eval()
    features = model.preprocess(TEXTS, task="document")
    with torch.inference_mode():
        eager = model(dict(features))["sentence_embedding"].clone()
        with sdpa_attention(model):
            assert any("forward" in vars(m) for m in model.modules())  # really patched
            fused = model(dict(features))["sentence_embedding"].clone()
        after = model(dict(features))["sentence_embedding"]
    assert not any("forward" in vars(m) for m in model.modules())
    assert (fused - eager).abs().max() < TOLERANCE
    torch.testing.assert_close(after, eager, rtol=0, atol=0)


def test_sdpa_off_gives_the_same_embeddings(tiny_mpnet_path):
    model = load_sentence_transformer(tiny_mpnet_path).eval()
    with_sdpa = encode(model, TEXTS, "document", batch_size=2, sdpa=True)
    without = encode(model, TEXTS, "document", batch_size=2, sdpa=False)
    assert np.abs(with_sdpa - without).max() < TOLERANCE


def test_bf16_model_close_to_its_sentence_transformers_encode(tiny_mpnet_path):
    model = load_sentence_transformer(tiny_mpnet_path).eval().to(torch.bfloat16)
    expected = _reference(model, TEXTS, "document")
    got = encode(model, TEXTS, "document", batch_size=3)
    cosine = (got * expected).sum(axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosine.min() > 0.999


def test_tokenize_chunk_sorts_by_token_length(tiny_teacher_path):
    model = load_sentence_transformer(tiny_teacher_path)
    chunk = tokenize_chunk(model, TEXTS, "document")
    assert sorted(chunk.order.tolist()) == list(range(len(TEXTS)))
    assert (np.diff(chunk.lengths) <= 0).all()
    assert chunk.lengths[0] == 64  # the long text, truncated to max_seq_length
    assert chunk.features["input_ids"].shape == (len(TEXTS), 64)
    np.testing.assert_array_equal(chunk.features["attention_mask"].sum(dim=1).numpy(), chunk.lengths)


@pytest.mark.parametrize("multiple", [1, 8])
def test_batch_bounds_fill_the_token_budget(multiple):
    lengths = np.array([200, 120, 64, 30, 30, 20, 12, 12, 9, 5, 3])
    budget = 256
    bounds = batch_bounds(lengths, budget, multiple)
    assert bounds[0][0] == 0 and bounds[-1][1] == len(lengths)
    assert all(stop == start for (_, stop, _), (start, _, _) in zip(bounds, bounds[1:], strict=False))
    for start, stop, width in bounds:
        assert width % multiple == 0 and width >= lengths[start]
        assert (stop - start) * width <= budget or stop - start == 1
        assert stop == len(lengths) or (stop - start + 1) * width > budget  # no room left for one more row
    assert bounds[-1][1] - bounds[-1][0] > 3  # short texts go many to a batch


def test_batch_bounds_keep_a_row_longer_than_the_budget():
    assert batch_bounds(np.array([300, 10]), budget=100, multiple=1) == [(0, 1, 300), (1, 2, 10)]


def test_models_with_prompts_fall_back_to_sentence_transformers(tiny_teacher_path, monkeypatch):
    model = load_sentence_transformer(tiny_teacher_path)
    model.prompts = {"document": "passage: "}
    calls = []
    original = model.encode_document

    def counting(texts, *args, **kwargs):
        calls.append(len(texts))
        return original(texts, *args, **kwargs)

    monkeypatch.setattr(model, "encode_document", counting)
    got = encode(model, TEXTS, "document", batch_size=4)
    assert sum(calls) == len(TEXTS)
    np.testing.assert_allclose(got, _reference(model, TEXTS, "document"), atol=TOLERANCE)


def test_chunks_come_back_in_order_with_progress(tiny_teacher_path):
    model = load_sentence_transformer(tiny_teacher_path)
    chunks = [TEXTS[:3], TEXTS[3:4], TEXTS[4:]]
    seen: list[int] = []
    parts = list(encode_chunks(model, chunks, "query", batch_size=2, on_batch=seen.append))
    assert [len(p) for p in parts] == [3, 1, len(TEXTS) - 4]
    assert sum(seen) == len(TEXTS)
    np.testing.assert_allclose(np.concatenate(parts), _reference(model, TEXTS, "query"), atol=TOLERANCE)
    assert torch.is_grad_enabled()  # the generator's inference mode does not leak into the caller


def test_pieces_start_small_double_up_to_the_largest_and_never_straddle_two_chunks():
    chunks = [[f"a{i}" for i in range(9)], [f"b{i}" for i in range(7)]]
    got = list(pieces(chunks, largest=4, first=1))
    assert [(number, len(texts)) for number, texts in got] == [(0, 1), (0, 2), (0, 4), (0, 2), (1, 4), (1, 3)]
    assert [t for _, texts in got for t in texts] == chunks[0] + chunks[1]
    with pytest.raises(ValueError, match="chunk 1 holds no texts"):
        list(pieces([["x"], []]))


def test_chunks_cut_into_many_pieces_come_back_whole_and_in_order(tiny_teacher_path, monkeypatch):
    model = load_sentence_transformer(tiny_teacher_path)
    monkeypatch.setattr(encoding, "FIRST_PIECE", 1)  # read at call time: pieces of 1, 2, 2, ... texts
    monkeypatch.setattr(encoding, "PIECE", 2)
    monkeypatch.setattr(encoding, "TOKENIZE_AHEAD", 2)
    chunks = [TEXTS[:5], TEXTS[5:6], TEXTS[6:]]
    parts = list(encode_chunks(model, chunks, "document", batch_size=2))
    assert [len(p) for p in parts] == [len(c) for c in chunks]
    np.testing.assert_allclose(np.concatenate(parts), _reference(model, TEXTS, "document"), atol=TOLERANCE)


def test_no_texts(tiny_teacher_path):
    model = load_sentence_transformer(tiny_teacher_path)
    assert encode(model, [], "document").shape == (0, 32)


def test_threaded_tokenization_equals_serial(tiny_teacher_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    model = load_sentence_transformer(tiny_teacher_path)
    monkeypatch.setattr(tokenization, "TOKENIZE_BATCH", 2)  # several sub-batches of different widths
    serial = tokenize_chunk(model, TEXTS, "document")
    with ThreadPoolExecutor(max_workers=3) as pool:
        threaded = tokenize_chunk(model, TEXTS, "document", pool)
    np.testing.assert_array_equal(threaded.order, serial.order)
    for name in ("input_ids", "attention_mask"):
        torch.testing.assert_close(threaded.features[name], serial.features[name], rtol=0, atol=0)
    monkeypatch.setattr(encoding, "tokenizer_threads", lambda device: 3)
    got = encode(model, TEXTS, "document", batch_size=2, chunk_size=5)
    assert np.abs(got - _reference(model, TEXTS, "document")).max() < TOLERANCE


# -- tokenisation straight through the Rust backend -------------------------------------------------------------------

TRICKY = [
    "",
    " ",
    "\t\n",
    "  padded with spaces  ",
    "word " * 500,  # far past max_seq_length (64): truncated
    "x" * 3000,  # one very long word: a single [UNK] / many word pieces
    "Ünïcödé naïve café 東京 Ελληνικά 🧬🔬 zero\u200bwidth e\u0301 \u00a0nbsp \ufeffbom \x00nul",
    "[CLS] [SEP] [MASK] [PAD] [UNK] <s> </s> <pad> <mask> in the middle of a text",
    "[SEP][SEP]glued[CLS]",
    "UPPER lower MiXeD, punctuation!?... (brackets) [square] {curly} 3.14159 1,000,000",
]


def _assert_same_chunk(got, expected):
    assert set(got.features) == set(expected.features)
    np.testing.assert_array_equal(got.order, expected.order)
    np.testing.assert_array_equal(got.lengths, expected.lengths)
    for name, value in expected.features.items():
        if torch.is_tensor(value):
            assert got.features[name].dtype == value.dtype, name
            torch.testing.assert_close(got.features[name], value, rtol=0, atol=0)
        else:
            assert got.features[name] == value


@pytest.mark.parametrize("kind", ["document", "query"])
def test_rust_tokenization_equals_preprocess_on_tricky_texts(model, kind):
    rust = rust_tokenizer(model, kind)
    assert isinstance(rust, RustTokenizer)  # the real fast tokenizers take the Rust path
    texts = TEXTS + TRICKY
    got = tokenize_chunk(model, texts, kind)
    assert rust.disabled is None and rust_tokenizer(model, kind) is rust  # checked, kept, made once
    _assert_same_chunk(got, preprocess_chunk(model, texts, kind))
    assert got.lengths[0] == 64 and got.features["input_ids"].shape[1] == 64  # truncated to max_seq_length
    # one row at a time: no text's tokens depend on its neighbours or on the chunk's padding
    for i, text in enumerate(texts):
        single = model.preprocess([text], task=kind)
        row = int(np.flatnonzero(got.order == i)[0])
        width = single["input_ids"].shape[1]
        torch.testing.assert_close(got.features["input_ids"][row, :width], single["input_ids"][0], rtol=0, atol=0)
        assert got.lengths[row] == width


def test_rust_tokenization_keeps_token_type_ids(tiny_teacher_path):
    model = load_sentence_transformer(tiny_teacher_path)
    chunk = tokenize_chunk(model, TEXTS, "document")
    assert "token_type_ids" in chunk.features  # BERT has them (MPNet has none: tested above by equality)
    assert chunk.features["modality"] == preprocess_chunk(model, TEXTS, "document").features["modality"]


@pytest.mark.parametrize("parallelism", ["true", "false"])
def test_rust_tokenization_with_threads_and_rayon(tiny_mpnet_path, monkeypatch, parallelism):
    from concurrent.futures import ThreadPoolExecutor

    model = load_sentence_transformer(tiny_mpnet_path)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", parallelism)
    monkeypatch.setattr(tokenization, "TOKENIZE_BATCH", 3)  # with rayon off: sub-batches in the pool's threads
    texts = (TEXTS + TRICKY) * 3
    with ThreadPoolExecutor(max_workers=3) as pool:
        got = tokenize_chunk(model, texts, "document", pool)
    _assert_same_chunk(got, preprocess_chunk(model, texts, "document"))


def test_rust_tokenizer_follows_max_seq_length(tiny_teacher_path):
    model = load_sentence_transformer(tiny_teacher_path)
    first = rust_tokenizer(model, "document")
    model.max_seq_length = 16
    second = rust_tokenizer(model, "document")
    assert second is not first and second.max_length == 16
    got = tokenize_chunk(model, TEXTS + TRICKY, "document")
    assert got.lengths.max() == 16
    _assert_same_chunk(got, preprocess_chunk(model, TEXTS + TRICKY, "document"))


def test_slow_tokenizer_falls_back_to_preprocess(tiny_teacher_path, monkeypatch):
    model = load_sentence_transformer(tiny_teacher_path)
    monkeypatch.setattr(type(model.tokenizer), "is_fast", property(lambda self: False))
    assert rust_tokenizer(model, "document") is None
    _assert_same_chunk(tokenize_chunk(model, TEXTS, "document"), preprocess_chunk(model, TEXTS, "document"))
    got = encode(model, TEXTS, "document", batch_size=2)
    assert np.abs(got - _reference(model, TEXTS, "document")).max() < TOLERANCE


def test_rust_tokenizer_that_differs_falls_back_to_preprocess(tiny_teacher_path, caplog):
    model = load_sentence_transformer(tiny_teacher_path)
    rust = rust_tokenizer(model, "document")
    rust.backend.enable_truncation(8)  # now it disagrees with preprocess on every text longer than 8 tokens
    with caplog.at_level("WARNING", logger="embeddistill.models.encoding"):
        got = tokenize_chunk(model, TEXTS, "document")
    assert rust.disabled and "input_ids" in rust.disabled and "does not match" in caplog.text
    assert rust_tokenizer(model, "document") is None  # not tried again for this model
    _assert_same_chunk(got, preprocess_chunk(model, TEXTS, "document"))
    got = encode(model, TEXTS, "document", batch_size=2)
    assert np.abs(got - _reference(model, TEXTS, "document")).max() < TOLERANCE


def test_a_difference_in_a_later_chunk_is_caught(tiny_teacher_path, monkeypatch):
    """Later checked chunks check their longest text: a truncation difference that the first chunk's texts missed."""
    model = load_sentence_transformer(tiny_teacher_path)
    short, long = TEXTS[:2], [TEXTS[2]]
    rust = rust_tokenizer(model, "document")
    monkeypatch.setattr(tokenization, "PROBE_TEXTS", ())
    monkeypatch.setattr(tokenization, "CHECK_EVERY", 1)  # every chunk checked
    rust.backend.enable_truncation(32)  # preprocess truncates at 64
    tokenize_chunk(model, short, "document")
    assert rust.disabled is None  # short texts: no difference to see
    _assert_same_chunk(tokenize_chunk(model, long, "document"), preprocess_chunk(model, long, "document"))
    assert rust.disabled


def test_chunks_are_checked_at_least_every_check_every_texts(tiny_teacher_path, monkeypatch):
    model = load_sentence_transformer(tiny_teacher_path)
    rust = rust_tokenizer(model, "document")
    monkeypatch.setattr(tokenization, "CHECK_EVERY", 4)
    checked: list[int] = []
    original = rust.check
    monkeypatch.setattr(rust, "check", lambda texts: checked.append(len(texts)) or original(texts))
    for size in (1, 2, 1, 1, 3, 1):  # texts since the last check: 2, 3, 4 (check), 3, 4 (check)
        tokenize_chunk(model, TEXTS[:size], "document")
    assert checked == [2 + len(tokenization.PROBE_TEXTS), 2, 2]  # the first (with the probes), the fourth, the sixth


def test_preprocess_with_other_row_features_falls_back(tiny_teacher_path, monkeypatch):
    model = load_sentence_transformer(tiny_teacher_path)
    original = model.preprocess

    def with_positions(texts, **kwargs):
        features = original(texts, **kwargs)
        features["position_ids"] = torch.arange(features["input_ids"].shape[1]).expand_as(features["input_ids"])
        return features

    rust = rust_tokenizer(model, "document")
    monkeypatch.setattr(model, "preprocess", with_positions)
    got = tokenize_chunk(model, TEXTS, "document")
    assert "position_ids" in got.features and "position_ids" in rust.disabled


@pytest.mark.slow  # compiling takes about half a minute on a CPU
def test_compiled_encoding_gives_the_same_embeddings_and_is_undone(tiny_mpnet_path):
    model = load_sentence_transformer(tiny_mpnet_path, device="cpu")
    eager = encode(model, TEXTS, "document", batch_size=2)
    compiled = encode(model, TEXTS, "document", batch_size=2, compile=True)
    assert np.abs(compiled - eager).max() < TOLERANCE
    assert "forward" not in vars(model[0].auto_model)  # the class's own forward again


def test_the_cached_position_bias_equals_mpnets_own_at_every_length():
    from transformers import MPNetConfig, MPNetModel

    from embeddistill.models.kernels import _position_bias

    encoder = MPNetModel(MPNetConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2)).encoder
    with torch.inference_mode():  # cached while encoding ...
        _position_bias(encoder, torch.zeros(1, 7, 16))
    for length in (1, 7, 64, 300, 7):  # ... and used where autograd records; 7 again: from the cache
        hidden = torch.zeros(3, length, 16)
        expected = encoder.compute_position_bias(hidden)[:1]
        assert torch.equal(_position_bias(encoder, hidden), expected)
    _position_bias(encoder, torch.zeros(1, 7, 16)).sum().backward()  # the bias's weights get their gradient
    assert encoder.relative_attention_bias.weight.grad is not None
