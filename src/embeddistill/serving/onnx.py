"""ONNX export of the online query encoder, and an ONNX Runtime encoder for serving.

Only the query side runs online, so only it is exported: :class:`~embeddistill.models.students.QueryEncoder`
(transformer + pooling + projection + normalisation, i.e. the Router's query route of an asymmetric student,
or the whole model of a teacher or symmetric student) becomes ``model.onnx`` with dynamic batch and sequence
axes; the tokenizer files are saved next to it, and ``export_info.json`` records what was exported.

    embeddistill export runs/quickstart/student --onnx runs/student-onnx
    OnnxQueryEncoder("runs/student-onnx").encode(["does vitamin D prevent fractures?"])
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from embeddistill.extras import require

logger = logging.getLogger(__name__)

EXPORT_INFO = "export_info.json"
ONNX_FILE = "model.onnx"
OUTPUT_NAME = "sentence_embedding"
SAMPLE_TEXTS = [
    "vitamin D",
    "Does taking vitamin D supplements every winter reduce the risk of hip fractures in older adults?",
    "0-dimensional biomaterials show inductive properties.",
]


def _query_encoder(model):
    from embeddistill.models.students import QueryEncoder
    from embeddistill.models.teachers import load_sentence_transformer

    if isinstance(model, str | os.PathLike):
        model = load_sentence_transformer(str(model))
    return QueryEncoder.of(model).to("cpu").float().eval()


def _wrapper(encoder, input_names: list[str]):
    import torch

    class OnnxQueryModule(torch.nn.Module):
        """Positional tensors in, ``sentence_embedding`` out: the signature ONNX export traces."""

        def __init__(self):
            super().__init__()
            self.encoder = encoder

        def forward(self, *tensors):
            return self.encoder(dict(zip(input_names, tensors, strict=True)))

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


def export_onnx(model, out_dir: str | os.PathLike, opset: int = 17, check_texts: list[str] | None = None) -> dict:
    """Export ``model``'s query encoder to ``out_dir`` (``model.onnx``, tokenizer, ``export_info.json``).

    The folder is assembled next to ``out_dir`` and renamed into place at the end, so a failed export leaves
    any previous export untouched. Returns the export info (with the parity on a few sample texts).
    """
    require("serve", "onnx", "onnxruntime", purpose="ONNX export")
    import onnx

    if opset < 17:
        raise ValueError(f"opset {opset} is too old: use 17 or newer")
    out_dir = Path(out_dir)
    encoder = _query_encoder(model)
    sample = encoder.tokenize(["a short query", SAMPLE_TEXTS[1]])  # padded: the attention mask is traced for real
    input_names = [name for name in ("input_ids", "attention_mask", "token_type_ids") if name in sample]
    args = tuple(sample[name] for name in input_names)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        started = time.perf_counter()
        exporter = _export_file(_wrapper(encoder, input_names), args, input_names, staging / ONNX_FILE, opset)
        export_seconds = time.perf_counter() - started
        onnx.checker.check_model(str(staging / ONNX_FILE))
        encoder.tokenizer.save_pretrained(str(staging))
        info = _export_info(model, encoder, input_names, opset, exporter, export_seconds)
        (staging / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        texts = check_texts or SAMPLE_TEXTS
        difference = float(np.abs(encoder.encode(texts) - OnnxQueryEncoder(staging).encode(texts)).max())
        info["parity_max_abs_diff_sample"] = difference
        if difference > 1e-3:
            raise RuntimeError(f"the ONNX model differs from PyTorch by {difference:.2e} on sample texts")
        (staging / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        _replace_folder(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("exported the query encoder to %s (%s exporter, opset %d)", out_dir, exporter, opset)
    return info


def _versions() -> dict:
    """What the exported graph depends on (:func:`embeddistill.runtime.environment_record`'s versions)."""
    from embeddistill.runtime import environment_record

    return environment_record(("torch", "onnx", "onnxruntime", "transformers", "sentence-transformers"))["versions"]


class OnnxQueryEncoder:
    """An exported query encoder run by ONNX Runtime: ``encode(texts) -> float32 [n, dimension]``.

    Tokenisation is the saved Hugging Face tokenizer with the export's maximum length, exactly as in PyTorch, of
    each text after the student's query prompt (``query_prompt`` in ``export_info.json``).
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        batch_size: int = 64,
        threads: int | None = None,
        providers: list[str] | None = None,
        spin: bool = False,
    ):
        require("serve", "onnxruntime", purpose=f"the ONNX query encoder in {folder}")
        import onnxruntime as ort
        from transformers import AutoTokenizer

        self.folder = Path(folder)
        info_path = self.folder / EXPORT_INFO
        if not info_path.is_file():
            raise FileNotFoundError(f"{self.folder} is not an ONNX export: {EXPORT_INFO} is missing")
        self.info = json.loads(info_path.read_text(encoding="utf-8"))
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder))
        self.max_length = int(self.info["max_length"])
        self.prompt = str(self.info.get("query_prompt") or "")  # exports made before prompts travelled had none
        self.batch_size = batch_size
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        if not spin:
            # Idle worker threads sleep instead of spinning: in a service they share the cores with the event
            # loop and the tokenizer, and spinning threads starve them.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            str(self.folder / self.info["onnx"]), options, providers=providers or ["CPUExecutionProvider"]
        )
        self.input_names = [i.name for i in self.session.get_inputs()]

    @property
    def dimension(self) -> int:
        return int(self.info["dimension"])

    def tokenize(self, texts: list[str]) -> dict[str, np.ndarray]:
        texts = [self.prompt + text for text in texts]
        features = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="np")
        shape = features["input_ids"].shape
        return {
            name: np.asarray(features[name], dtype=np.int64) if name in features else np.zeros(shape, dtype=np.int64)
            for name in self.input_names
        }

    def run(self, features: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run([self.info["output"]], features)[0]

    def encode(self, texts: list[str], batch_size: int | None = None) -> np.ndarray:
        texts = list(texts)
        size = batch_size or self.batch_size
        parts = [self.run(self.tokenize(texts[i : i + size])) for i in range(0, len(texts), size)]
        if not parts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return np.concatenate(parts).astype(np.float32, copy=False)


def _timed_ms(name: str, function, batches: list[list[str]], warmup: int) -> dict[str, float]:
    """``{name}_ms``: the median milliseconds of ``function`` over the batches after ``warmup``; ``{name}_p10_ms``
    and ``{name}_p90_ms``: the spread of those repeats."""
    timings = []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        function(batch)
        if i >= warmup:
            timings.append((time.perf_counter() - start) * 1000)
    low, high = np.percentile(timings, [10, 90])
    return {f"{name}_ms": statistics.median(timings), f"{name}_p10_ms": float(low), f"{name}_p90_ms": float(high)}


def compare_with_pytorch(
    model,
    onnx_dir: str | os.PathLike,
    texts: list[str],
    index=None,
    k: int = 10,
    batch_sizes: tuple[int, ...] = (1, 32),
    repeats: int = 30,
    warmup: int = 3,
) -> dict:
    """Parity and CPU latency of the ONNX export against the PyTorch query encoder on ``texts``.

    Parity: max abs difference of the embeddings and, given a :class:`~embeddistill.serving.indexing.SearchIndex`,
    how many queries get the identical top-``k`` list (same ids, same order). Latency: median milliseconds per
    batch and the p10/p90 of the repeats, tokenisation included for both, ONNX Runtime with as many threads as torch.
    """
    import torch

    encoder = _query_encoder(model)
    threads = torch.get_num_threads()
    runtime = OnnxQueryEncoder(onnx_dir, threads=threads)
    reference = encoder.encode(texts, batch_size=32)
    exported = runtime.encode(texts, batch_size=32)
    difference = np.abs(reference - exported)
    result: dict = {
        "queries": len(texts),
        "max_abs_diff": float(difference.max()),
        "mean_abs_diff": float(difference.mean()),
        "min_cosine": float(
            np.min(
                (reference * exported).sum(1)
                / (np.linalg.norm(reference, axis=1) * np.linalg.norm(exported, axis=1) + 1e-12)
            )
        ),
    }
    if index is not None:
        torch_top = [[d for d, _ in hits] for hits in index.ranked(reference, k)]
        onnx_top = [[d for d, _ in hits] for hits in index.ranked(exported, k)]
        identical = sum(a == b for a, b in zip(torch_top, onnx_top, strict=True))
        result[f"identical_top{k}"] = identical
        result[f"identical_top{k}_fraction"] = identical / len(texts)
        result[f"top{k}_set_overlap"] = float(
            np.mean([len(set(a) & set(b)) / max(1, len(a)) for a, b in zip(torch_top, onnx_top, strict=True)])
        )
    latency = {}
    with torch.inference_mode():
        for size in batch_sizes:
            batches = [[texts[(i * size + j) % len(texts)] for j in range(size)] for i in range(repeats + warmup)]
            timed = _timed_ms("pytorch", lambda b: encoder(encoder.tokenize(b)), batches, warmup)
            timed |= _timed_ms("onnxruntime", lambda b: runtime.run(runtime.tokenize(b)), batches, warmup)
            latency[f"batch{size}"] = {**timed, "speedup": timed["pytorch_ms"] / timed["onnxruntime_ms"]}
    result["latency"] = latency
    result["threads"] = threads
    result["repeats"] = repeats
    return result
