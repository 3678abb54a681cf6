"""ONNX export of the query encoder: parity with PyTorch, dynamic axes, top-10 agreement, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from embeddistill.cli import main  # noqa: E402
from embeddistill.data import RetrievalDataset  # noqa: E402
from embeddistill.models.students import QueryEncoder, build_student, make_projection  # noqa: E402
from embeddistill.models.teachers import load_sentence_transformer  # noqa: E402
from embeddistill.serving.indexing import SearchIndex  # noqa: E402
from embeddistill.serving.onnx import EXPORT_INFO, OnnxQueryEncoder, compare_with_pytorch, export_onnx  # noqa: E402


@pytest.fixture(scope="module")
def student_dir(tiny_teacher_path, tmp_path_factory):
    """An asymmetric tiny student whose query route has a (random) projection, as a 48-d student would."""
    teacher = load_sentence_transformer(tiny_teacher_path)
    student = build_student("teacher:2", teacher, asymmetric=True)
    modules = list(student[0].sub_modules["query"])
    # a 32 -> 32 projection before Normalize, so that the exported graph covers Dense too
    student[0].sub_modules["query"] = torch.nn.Sequential(*modules[:-1], make_projection(32, 32), modules[-1])
    folder = tmp_path_factory.mktemp("student") / "student"
    student.save(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def exported(student_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "student-onnx"
    info = export_onnx(student_dir, out)
    return out, info


def test_export_folder(exported, student_dir):
    out, info = exported
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", EXPORT_INFO, "tokenizer.json", "tokenizer_config.json"} <= names
    saved = json.loads((out / EXPORT_INFO).read_text())
    assert saved["opset"] >= 17 and saved["dimension"] == 32 and saved["normalized"] is True
    assert saved["inputs"] == ["input_ids", "attention_mask"] and saved["output"] == "sentence_embedding"
    assert saved["source"] == Path(student_dir).name  # the export travels: no local path in it
    assert saved["parity_max_abs_diff_sample"] < 1e-4
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # staging folder renamed away


def test_parity_on_real_queries_and_dynamic_axes(exported, student_dir, scifact_slice):
    out, _ = exported
    texts = list(RetrievalDataset.load(str(scifact_slice)).queries.values())[:64]
    reference = QueryEncoder.of(load_sentence_transformer(student_dir)).eval().encode(texts)
    runtime = OnnxQueryEncoder(out)
    for batch_size in (1, 7, 64):  # different batch sizes and padded lengths through the same graph
        np.testing.assert_allclose(runtime.encode(texts, batch_size=batch_size), reference, atol=1e-4)
    long_query = " ".join(["protein"] * 500)  # truncated to max_length like in PyTorch
    np.testing.assert_allclose(
        runtime.encode([long_query]),
        QueryEncoder.of(load_sentence_transformer(student_dir)).encode([long_query]),
        atol=1e-4,
    )
    assert runtime.encode([]).shape == (0, 32)


@pytest.fixture(scope="module")
def slice_index(scifact_slice, tiny_teacher_path):
    dataset = RetrievalDataset.load(str(scifact_slice))
    documents = load_sentence_transformer(tiny_teacher_path).encode_document(
        list(dataset.corpus.values()), convert_to_numpy=True
    )
    return SearchIndex.build(documents, list(dataset.corpus))


def test_identical_top10_and_latency(exported, student_dir, scifact_slice, slice_index):
    out, _ = exported
    dataset = RetrievalDataset.load(str(scifact_slice))
    index = slice_index
    result = compare_with_pytorch(
        student_dir, out, list(dataset.queries.values()), index=index, k=10, batch_sizes=(1, 4), repeats=3, warmup=1
    )
    assert result["max_abs_diff"] < 1e-4
    assert result["identical_top10_fraction"] > 0.95 and result["top10_set_overlap"] > 0.99
    assert set(result["latency"]) == {"batch1", "batch4"}
    assert result["latency"]["batch1"]["onnxruntime_ms"] > 0
    for engine in ("pytorch", "onnxruntime"):  # the median of the repeats and their spread
        timed = result["latency"]["batch4"]
        assert timed[f"{engine}_p10_ms"] <= timed[f"{engine}_ms"] <= timed[f"{engine}_p90_ms"]


def test_searcher_accepts_an_onnx_folder(exported, student_dir, slice_index):
    from embeddistill.serving.search import Searcher

    out, _ = exported
    index = slice_index
    query = ["vitamin D deficiency"]
    via_onnx = Searcher(index, str(out)).search(query, k=5)[0]
    via_torch = Searcher(index, student_dir).search(query, k=5)[0]
    assert [h.id for h in via_onnx] == [h.id for h in via_torch]


def test_export_command(student_dir, scifact_slice, tiny_teacher_path, tmp_path, capsys):
    index_dir = tmp_path / "index"
    assert (
        main(
            [
                "index",
                "--model",
                tiny_teacher_path,
                "--dataset",
                str(scifact_slice),
                "--out",
                str(index_dir),
                "--cache-dir",
                str(tmp_path / "cache"),
            ]
        )
        == 0
    )
    report = tmp_path / "onnx.json"
    argv = [
        "export",
        student_dir,
        "--onnx",
        str(tmp_path / "onnx"),
        "--check-dataset",
        str(scifact_slice),
        "--check-index",
        str(index_dir),
        "--repeats",
        "2",
        "--report",
        str(report),
    ]
    assert main(argv) == 0
    result = json.loads(report.read_text())
    assert result["max_abs_diff"] < 1e-4 and result["identical_top10_fraction"] > 0.95
    assert "exported the query encoder" in capsys.readouterr().out
    # re-exporting into the same folder replaces it
    assert main(["export", student_dir, "--onnx", str(tmp_path / "onnx")]) == 0
    with pytest.raises(ValueError, match="opset"):
        export_onnx(student_dir, tmp_path / "old", opset=11)


def test_the_lean_tokenizer_gives_the_ids_and_mask_of_the_transformers_tokenizer(exported):
    out, _ = exported
    runtime = OnnxQueryEncoder(out)
    texts = ["vitamin D", "Does  taking VITAMIN d reduce fractures?", "x " * 400, "é à ü 0-dimensional"]
    for batch in ([texts[1]], [texts[2]], texts):
        expected = runtime.tokenizer(batch, padding=True, truncation=True, max_length=runtime.max_length)
        features = runtime.tokenize(batch)
        assert features["input_ids"].tolist() == expected["input_ids"]
        assert features["attention_mask"].tolist() == expected["attention_mask"]
    assert runtime.input_names == ["input_ids", "attention_mask"]  # token type ids are constants in the graph


def test_the_graph_makes_its_zero_token_type_ids_in_one_operator(exported):
    import onnx

    out, _ = exported
    operators = [node.op_type for node in onnx.load(str(out / "model.onnx")).graph.node]
    # zeros shaped like the input ids, not the slice-and-expand of the model's token-type buffer
    assert operators.count("ConstantOfShape") == 1 and "GatherElements" not in operators and "Where" not in operators


def test_an_int8_export_checked_on_a_dataset_is_offered_with_its_ndcg_ratio(student_dir, scifact_slice, tmp_path):
    from embeddistill.serving.onnx import ParityCheck

    out = tmp_path / "int8"
    check = ParityCheck(str(scifact_slice), "test", str(tmp_path / "cache"))
    info = export_onnx(student_dir, out, int8=True, parity=check)
    assert (out / "model.int8.onnx").is_file() and info["retrieval_parity"]["queries"] > 0
    int8 = info["precisions"]["int8"]
    assert isinstance(int8["offered"], bool) and int8["nDCG@10_ratio_vs_fp32"] >= 0
    assert info["precisions"]["fp32"]["offered"] is True
    assert info["default_precision"] == ("int8" if int8["offered"] else "fp32")
    # Whether int8 passes depends on the tiny random model (its ratio is what the check is for): both ways are right.
    if not int8["offered"]:
        with pytest.raises(ValueError, match="not offered"):
            OnnxQueryEncoder(out, precision="int8")
        return
    texts = ["vitamin D deficiency", "bone density in older adults"]
    embeddings = OnnxQueryEncoder(out, precision="int8").encode(texts)
    assert embeddings.shape == (2, 32) and np.allclose(np.linalg.norm(embeddings, axis=1), 1, atol=1e-3)


def test_a_precision_that_failed_its_parity_check_is_refused_and_an_unchecked_int8_is_not_the_default(
    student_dir, tmp_path
):
    out = tmp_path / "unchecked"
    info = export_onnx(student_dir, out, int8=True)
    assert info["default_precision"] == "fp32" and info["precisions"]["int8"]["offered"] is None
    assert OnnxQueryEncoder(out).precision == "fp32"
    saved = json.loads((out / EXPORT_INFO).read_text())
    saved["precisions"]["int8"].update(offered=False, reason="nDCG@10 0.9 of PyTorch fp32's")
    (out / EXPORT_INFO).write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="not offered: nDCG@10 0.9"):
        OnnxQueryEncoder(out, precision="int8")
