"""Symmetric training embeds a batch's documents in sorted chunks of similar length (``embed_by_length``).

The chunks only drop padding: embeddings, their order and the gradients must equal one padded batch of all texts.
The chunks' shapes change every step, so training keeps cuDNN's attention (which plans each shape) out.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embeddistill.models.students import QueryEncoder
from embeddistill.models.teachers import load_sentence_transformer
from embeddistill.runtime import forward_context
from embeddistill.training.batching import DocumentTokens, embed_by_length, length_chunks, pad_token_ids

TEXTS = [" ".join(["protein", "cell", "mice", "bone"][: 1 + i % 4] * (1 + (7 * i) % 9)) + f" {i}" for i in range(11)]


def embeddings_and_gradient(path: str, embed) -> tuple[torch.Tensor, torch.Tensor]:
    model = load_sentence_transformer(path)
    encoder = QueryEncoder.of(model)
    embeddings = embed(model, encoder)
    (embeddings * torch.arange(embeddings.shape[1])).sum().backward()  # weights tell the dimensions apart
    query_weight = model[0].auto_model.encoder.layer[0].attention.self.query.weight
    return embeddings.detach(), query_weight.grad


def test_sorted_chunks_give_the_same_embeddings_in_order_and_the_same_gradients(tiny_teacher_path):
    def one_batch(model, encoder):
        return model(dict(encoder.tokenize(TEXTS)))["sentence_embedding"]

    def chunks(model, encoder):
        token_ids = DocumentTokens(TEXTS, encoder.tokenizer, encoder.max_length).of(range(len(TEXTS)))
        return embed_by_length(model, token_ids, encoder.tokenizer, torch.device("cpu"), chunk_tokens=60)

    tokenizer = QueryEncoder.of(load_sentence_transformer(tiny_teacher_path)).tokenizer
    lengths = [len(ids) for ids in tokenizer(TEXTS)["input_ids"]]
    assert lengths != sorted(lengths) and len(set(lengths)) > 3  # the chunks reorder texts and differ in padding
    assert len(length_chunks(sorted(lengths), 60)) > 2

    expected, expected_gradient = embeddings_and_gradient(tiny_teacher_path, one_batch)
    embeddings, gradient = embeddings_and_gradient(tiny_teacher_path, chunks)
    torch.testing.assert_close(embeddings, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gradient, expected_gradient, atol=1e-6, rtol=1e-4)
    assert embeddings.dtype == torch.float32


def test_length_chunks_pad_at_most_the_budget_and_keep_an_overlong_text_alone():
    chunks = length_chunks([3, 3, 4, 10, 10, 20], chunk_tokens=12)
    # 3 texts padded to 4 = 12 tokens; two texts of 10 would be 20 > 12; 20 alone exceeds the budget but must run
    assert [(c.start, c.stop) for c in chunks] == [(0, 3), (3, 4), (4, 5), (5, 6)]
    assert length_chunks([5] * 4, chunk_tokens=100) == [slice(0, 4)]
    assert length_chunks([], chunk_tokens=10) == []


def test_padding_without_a_padding_token_is_a_clear_error(tiny_teacher_path):
    tokenizer = QueryEncoder.of(load_sentence_transformer(tiny_teacher_path)).tokenizer
    tokenizer.pad_token = None
    with pytest.raises(ValueError, match="no padding token"):
        pad_token_ids([np.array([101, 7, 102])], tokenizer)


def test_training_steps_run_attention_without_cudnn_and_restore_it_after():
    # cuDNN's attention plans each new input shape on the CPU; training meets new shapes every step (speed_gpu.json).
    assert torch.backends.cuda.cudnn_sdp_enabled()
    with forward_context(torch.device("cpu"), bf16=False):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
        assert torch.backends.cuda.math_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_prefilled_document_tokens_equal_those_tokenized_on_demand_and_skip_padding_rows(tiny_teacher_path):
    tokenizer = QueryEncoder.of(load_sentence_transformer(tiny_teacher_path)).tokenizer
    on_demand = DocumentTokens(TEXTS, tokenizer, 16)
    prefilled = DocumentTokens(TEXTS, tokenizer, 16)
    prefilled.prefill(np.array([[3, 1, -1], [1, 7, 10]]), chunk=2)  # a negative pool's -1 padding is no document
    assert sorted(prefilled._ids) == [1, 3, 7, 10]
    for got, expected in zip(prefilled.of([10, 3, 1, 7, 0]), on_demand.of([10, 3, 1, 7, 0]), strict=True):
        np.testing.assert_array_equal(got, expected)
    assert max(len(ids) for ids in prefilled.of(range(len(TEXTS)))) == 16  # truncated to max_length
