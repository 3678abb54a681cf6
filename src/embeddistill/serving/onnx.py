"""ONNX export of the online query encoder (fp32, and int8 by dynamic quantisation), checked before it is offered.

Only the query side runs online, so only it is exported: :class:`~embeddistill.models.students.QueryEncoder`
(transformer + pooling + projection + normalisation, i.e. the Router's query route of an asymmetric student,
or the whole model of a teacher or symmetric student) becomes ``model.onnx`` with dynamic batch and sequence
axes. The graph takes ``input_ids`` and ``attention_mask`` only (token type ids, zeros for one text, are made inside
it) and holds pooling, projection and normalisation, fused by ONNX Runtime's transformer optimiser where it can.
With ``int8``, ``model.int8.onnx`` is its dynamic quantisation (``onnxruntime.quantization.quantize_dynamic``),
by default with one weight scale per output channel and 7-bit weights. On a CPU without VNNI (AVX2), over SciFact's
queries, that keeps a mean cosine of 0.992-0.996 to the PyTorch embeddings for two 2-layer students and
all-MiniLM-L6-v2 (0.88 for all-mpnet-base-v2), where one scale per tensor and 8-bit weights keep 0.96-0.98 (0.72):
such CPUs saturate sums of 8-bit products, and one scale per channel with 8-bit weights is worse still there.
Given a :class:`~embeddistill.serving.onnx_parity.ParityCheck`, each precision is offered only if its nDCG@10 is
within 0.5% of the PyTorch fp32 encoder's; ``export_info.json`` records the ratios and the default precision.

    embeddistill export runs/quickstart/student --onnx runs/student-onnx --int8 --check-dataset scifact
    OnnxQueryEncoder("runs/student-onnx").encode(["does vitamin D prevent fractures?"])
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from embeddistill.extras import require
from embeddistill.serving.onnx_parity import ParityCheck, compare_with_pytorch, load_query_encoder, retrieval_parity
from embeddistill.serving.onnx_runtime import EXPORT_INFO, OnnxQueryEncoder

__all__ = ["EXPORT_INFO", "OnnxQueryEncoder", "ParityCheck", "compare_with_pytorch", "export_onnx"]

logger = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
OUTPUT_NAME = "sentence_embedding"
INPUT_NAMES = ["input_ids", "attention_mask"]
SAMPLE_TEXTS = [
    "vitamin D",
    "Does taking vitamin D supplements every winter reduce the risk of hip fractures in older adults?",
    "0-dimensional biomaterials show inductive properties.",
]


def _eager_attention(encoder) -> None:
    """Trace the plain attention (matmul, softmax, matmul) rather than SDPA: the pattern ONNX Runtime fuses into
    one Attention operator. Same arithmetic; the PyTorch model is a private copy loaded for the export."""
    for module in encoder.modules():
        if hasattr(module, "set_attn_implementation") and hasattr(module, "config"):
            try:
                module.set_attn_implementation("eager")
            except (ValueError, AttributeError, NotImplementedError) as error:
                logger.info("attention left as is for the export: %s", error)


def _wrapper(encoder, input_names: list[str]):
    import torch

    # Token type ids are all zeros for one text, as the tokenizer makes them; given as zeros shaped like the input
    # ids, they trace to one ConstantOfShape instead of the model's slice-and-expand of its buffer (some 15 small
    # operators that ONNX Runtime runs on every call).
    token_types = "token_type_ids" in getattr(encoder.tokenizer, "model_input_names", ())

    class OnnxQueryModule(torch.nn.Module):
        """Positional tensors in, ``sentence_embedding`` out: the signature ONNX export traces."""

        def __init__(self):
            super().__init__()
            self.encoder = encoder

        def forward(self, *tensors):
            features = dict(zip(input_names, tensors, strict=True))
            if token_types and "token_type_ids" not in features:
                features["token_type_ids"] = torch.zeros_like(features["input_ids"])
            return self.encoder(features)

    return OnnxQueryModule().eval()


def _export_file(wrapper, args: tuple, input_names: list[str], path: Path, opset: int) -> str:
    """Export with the TorchScript exporter (reliable with dynamic axes), else the dynamo exporter."""
    import torch

    dynamic_axes = {name: {0: "batch", 1: "sequence"} for name in input_names}
    dynamic_axes[OUTPUT_NAME] = {0: "batch"}
    common = {"input_names": input_names, "output_names": [OUTPUT_NAME], "opset_version": opset}
    errors = []
    with torch.no_grad(), warnings.catch_warnings():
        # Tracing warns about every Python branch on a tensor's shape (transformers' masks, the pooling) and about
        # how advanced indexing is exported: the parity check after the export is what tells whether it is right.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator", category=UserWarning)
        try:
            torch.onnx.export(
                wrapper, args, str(path), dynamic_axes=dynamic_axes, do_constant_folding=True, dynamo=False, **common
            )
            return "torchscript"
        except Exception as error:  # noqa: BLE001 - fall back to the other exporter, report both if it fails too
            errors.append(f"torchscript: {type(error).__name__}: {error}")
            logger.warning("TorchScript ONNX export failed (%s); trying the dynamo exporter", errors[-1][:300])
        try:
            torch.onnx.export(wrapper, args, str(path), dynamic_axes=dynamic_axes, dynamo=True, **common)
            return "dynamo"
        except Exception as error:  # noqa: BLE001
            errors.append(f"dynamo: {type(error).__name__}: {error}")
    raise RuntimeError("ONNX export failed:\n  " + "\n  ".join(e[:2000] for e in errors))


def _export_info(model, encoder, input_names: list[str], opset: int, exporter: str, export_seconds: float) -> dict:
    """``export_info.json``: what was exported and how, so a loader can check the folder before serving it."""
    import torch

    from embeddistill.evaluation.model_card import public_name  # the export travels: no local path in it

    with torch.inference_mode():
        probe = encoder(encoder.tokenize(["x"]))
    return {
        "format": "embeddistill-onnx-query-encoder/1",
        "source": public_name(str(model)) if isinstance(model, str | os.PathLike) else type(model).__name__,
        "onnx": ONNX_FILE,
        "inputs": input_names,
        "output": OUTPUT_NAME,
        "dynamic_axes": {"batch": 0, "sequence": 1},
        "dimension": int(probe.shape[1]),
        "max_length": int(encoder.max_length),
        "query_prompt": encoder.prompt,  # put before every query, as the student's encode_query does
        "normalized": any(type(m).__name__ == "Normalize" for m in encoder.modules_),
        "opset": opset,
        "exporter": exporter,
        "export_seconds": export_seconds,
        "versions": _versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _replace_folder(staging: Path, out_dir: Path) -> None:
    """Rename the finished ``staging`` folder to ``out_dir``; a previous export is removed only after the swap."""
    from embeddistill.storage import folder_mode

    os.chmod(staging, folder_mode())  # mkdtemp creates 0700; the export gets the umask's mode, like a mkdir
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(staging, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _attention_shape(encoder) -> tuple[int, int]:
    """``(heads, hidden size)`` of the transformer, for the attention fusion (0, 0: let it guess)."""
    for module in encoder.modules():
        config = getattr(module, "config", None)
        if getattr(config, "num_attention_heads", None) and getattr(config, "hidden_size", None):
            return int(config.num_attention_heads), int(config.hidden_size)
    return 0, 0


def _fuse(path: Path, encoder) -> list[str]:
    """Rewrite ``path`` with ONNX Runtime's transformer fusions (attention, layer norms, GELU, embeddings) where
    they apply; returns the fused operator kinds (none where the optimiser does not know the model)."""
    from onnxruntime.transformers.optimizer import optimize_model

    heads, hidden = _attention_shape(encoder)
    try:
        optimized = optimize_model(str(path), model_type="bert", num_heads=heads, hidden_size=hidden, opt_level=0)
    except Exception as error:  # noqa: BLE001 - the plain graph is correct, the fusions only make it faster
        logger.warning("transformer fusions skipped: %s: %s", type(error).__name__, str(error)[:300])
        return []
    fused = sorted({n.op_type for n in optimized.model.graph.node if n.domain == "com.microsoft"})
    if fused:
        optimized.save_model_to_file(str(path))
    return fused


def _quantize(source: Path, target: Path, per_channel: bool, reduce_range: bool) -> dict:
    """Dynamic int8 quantisation of the MatMul weights (and fused Attention): activations quantised per call."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    settings = {"weight_type": "QInt8", "per_channel": per_channel, "reduce_range": reduce_range}
    quantize_dynamic(
        str(source),
        str(target),
        weight_type=QuantType.QInt8,
        per_channel=per_channel,
        reduce_range=reduce_range,
        extra_options={"MatMulConstBOnly": True, "DefaultTensorType": 1},  # 1: FLOAT, past fused ops
    )
    return settings


def _sample_difference(encoder, folder: Path, precision: str, texts: list[str]) -> float:
    runtime = OnnxQueryEncoder(folder, precision=precision)
    return float(np.abs(encoder.encode(texts) - runtime.encode(texts)).max())


def _check(staging: Path, info: dict, model, parity: ParityCheck | None) -> None:
    """Retrieval parity of each precision in ``info["precisions"]``: offered or not, and the default precision."""
    precisions = info["precisions"]
    if parity is None:
        info["default_precision"] = "fp32"
        if "int8" in precisions:
            precisions["int8"]["reason"] = "no retrieval-parity check was run (give a check dataset)"
            logger.warning("the int8 model is not offered: %s", precisions["int8"]["reason"])
        return
    encoders = {f"onnx_{name}": OnnxQueryEncoder(staging, precision=name, threads=None).encode for name in precisions}
    result = retrieval_parity(model, encoders, parity)
    info["retrieval_parity"] = result
    for name, entry in precisions.items():
        row = result[f"onnx_{name}"]
        entry[f"{parity.metric}_ratio_vs_fp32"] = row[f"{parity.metric}_ratio_vs_fp32"]
        entry["offered"] = row["passed"]
        if not row["passed"]:
            entry["reason"] = (
                f"{parity.metric} on {result['dataset']} {parity.split} is {row[f'{parity.metric}_ratio_vs_fp32']:.4f}"
                f" of PyTorch fp32's (below {parity.min_ratio})"
            )
            logger.warning("the %s ONNX model is not offered: %s", name, entry["reason"])
    if not precisions["fp32"]["offered"]:
        raise RuntimeError(f"the fp32 ONNX model fails the retrieval-parity check: {precisions['fp32']['reason']}")
    info["default_precision"] = "int8" if precisions.get("int8", {}).get("offered") else "fp32"


def _build(staging: Path, model, encoder, opset: int, int8: dict | None, fuse: bool) -> dict:
    """Export, fuse, quantise and sample-check into ``staging``; returns the export info (not yet checked)."""
    import onnx

    sample = encoder.tokenize(["a short query", SAMPLE_TEXTS[1]])  # padded: the attention mask is traced for real
    args = tuple(sample[name] for name in INPUT_NAMES)
    if fuse:
        _eager_attention(encoder)
    started = time.perf_counter()
    exporter = _export_file(_wrapper(encoder, INPUT_NAMES), args, INPUT_NAMES, staging / ONNX_FILE, opset)
    onnx.checker.check_model(str(staging / ONNX_FILE))
    plain = staging / "plain.onnx"
    shutil.copy(staging / ONNX_FILE, plain)
    fused = _fuse(staging / ONNX_FILE, encoder) if fuse else []
    encoder.tokenizer.save_pretrained(str(staging))
    info = _export_info(model, encoder, INPUT_NAMES, opset, exporter, 0.0)
    info["fused_operators"] = fused
    info["precisions"] = {"fp32": {"file": ONNX_FILE, "offered": None}}
    (staging / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    if fused and _sample_difference(encoder, staging, "fp32", SAMPLE_TEXTS) > 1e-3:
        logger.warning("the fused graph differs from PyTorch: exporting the unfused one")
        shutil.copy(plain, staging / ONNX_FILE)
        info["fused_operators"] = []
    plain.unlink()
    if int8 is not None:
        settings = _quantize(staging / ONNX_FILE, staging / INT8_FILE, **int8)
        info["precisions"]["int8"] = {"file": INT8_FILE, "offered": None, "quantization": settings}
    info["export_seconds"] = time.perf_counter() - started
    (staging / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


def export_onnx(
    model,
    out_dir: str | os.PathLike,
    opset: int = 17,
    check_texts: list[str] | None = None,
    int8: bool = False,
    per_channel: bool = True,
    reduce_range: bool = True,
    parity: ParityCheck | None = None,
    fuse: bool = True,
) -> dict:
    """Export ``model``'s query encoder to ``out_dir`` (``model.onnx``, with ``int8`` ``model.int8.onnx``,
    tokenizer, ``export_info.json``), each precision checked against PyTorch on sample texts and, given ``parity``,
    for retrieval parity (a failing int8 is kept but not offered; a failing fp32 fails the export).

    The folder is assembled next to ``out_dir`` and renamed into place at the end, so a failed export leaves
    any previous export untouched. Returns the export info.
    """
    require("serve", "onnx", "onnxruntime", purpose="ONNX export")
    if opset < 17:
        raise ValueError(f"opset {opset} is too old: use 17 or newer")
    out_dir = Path(out_dir)
    encoder = load_query_encoder(model)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        quantization = {"per_channel": per_channel, "reduce_range": reduce_range} if int8 else None
        info = _build(staging, model, encoder, opset, quantization, fuse)
        texts = check_texts or SAMPLE_TEXTS
        info["parity_max_abs_diff_sample"] = _sample_difference(encoder, staging, "fp32", texts)
        if info["parity_max_abs_diff_sample"] > 1e-3:
            raise RuntimeError(
                f"the ONNX model differs from PyTorch by {info['parity_max_abs_diff_sample']:.2e} on sample texts"
            )
        if int8:
            info["precisions"]["int8"]["max_abs_diff_sample"] = _sample_difference(encoder, staging, "int8", texts)
        _check(staging, info, model, parity)
        (staging / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        _replace_folder(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("exported the query encoder to %s (%s exporter, opset %d)", out_dir, info["exporter"], opset)
    return info


def _versions() -> dict:
    """What the exported graph depends on (:func:`embeddistill.runtime.environment_record`'s versions)."""
    from embeddistill.runtime import environment_record

    return environment_record(("torch", "onnx", "onnxruntime", "transformers", "sentence-transformers"))["versions"]
