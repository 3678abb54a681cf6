"""The ONNX Runtime query encoder: a lean path from query texts to embeddings.

An export folder (:mod:`embeddistill.serving.onnx`) holds ``model.onnx`` (fp32) and, when exported with int8,
``model.int8.onnx``; ``export_info.json`` says which precisions passed their retrieval-parity check and which one is
the default. The query path is as short as it can be in Python: the Rust tokenizer (``tokenizers``) called
directly, no padding for one query, only the inputs the graph takes (token type ids are constants inside it), and
pooling, projection and normalisation inside the graph, so one ``session.run`` gives the embedding.

    OnnxQueryEncoder("runs/student-onnx").encode(["does vitamin D prevent fractures?"])
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from embeddistill.extras import require

logger = logging.getLogger(__name__)

EXPORT_INFO = "export_info.json"


class LeanTokenizer:
    """The saved fast tokenizer's Rust core, called without the ``transformers`` wrapper.

    Same ids as ``tokenizer(texts, padding=True, truncation=True, max_length=...)``: the same normaliser,
    pre-tokeniser, special tokens and longest-first truncation; a batch is padded to its longest text with the
    tokenizer's pad token (on the tokenizer's side, left or right).
    """

    def __init__(self, tokenizer, max_length: int):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())  # a copy: settings are ours
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length)
        self.padded = Tokenizer.from_str(self.tokenizer.to_str())
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.padded.enable_padding(
            direction=tokenizer.padding_side, pad_id=pad_id, pad_token=tokenizer.pad_token or "[PAD]"
        )

    def __call__(self, texts: list[str], mask: bool = True) -> dict[str, np.ndarray]:
        """``input_ids`` and (with ``mask``) ``attention_mask``, int64 arrays ``[len(texts), longest]``."""
        if len(texts) == 1:
            ids = np.array([self.tokenizer.encode(texts[0]).ids], dtype=np.int64)
            return {"input_ids": ids, "attention_mask": np.ones_like(ids)} if mask else {"input_ids": ids}
        encodings = self.padded.encode_batch(list(texts))
        features = {"input_ids": np.array([e.ids for e in encodings], dtype=np.int64)}
        if mask:
            features["attention_mask"] = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        return features


def session_options(threads: int | None, spin: bool):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spin:
        # Idle worker threads sleep instead of spinning: in a service they share the cores with the event
        # loop and the tokenizer, and spinning threads starve them (ONNX Runtime's default spinning keeps a core
        # busy some 45 ms after every call). Spinning only within a call ("session.force_spinning_stop") was
        # measured and not taken: on a 2-core VM it made back-to-back batch-1 calls a fifth faster but calls after
        # a few idle milliseconds slower (2.3 -> 3.6 ms median at 20 ms gaps), and the int8 smallest student in a
        # copy of speed_cpu.py's interleaved loop (after PyTorch encoders) 1.8 -> 4.5-5.8 ms.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _onnx_file(info: dict, precision: str | None, folder: Path) -> tuple[str, str]:
    """``(precision, file)`` to load: the export's default, or the one asked for if its parity check allows it."""
    precisions = info.get("precisions") or {"fp32": {"file": info["onnx"], "offered": True}}
    precision = precision or info.get("default_precision", "fp32")
    if precision not in precisions:
        raise ValueError(f"{folder} has no {precision} model (it has: {', '.join(precisions)})")
    entry = precisions[precision]
    if entry.get("offered") is False:
        reason = entry.get("reason", "its retrieval-parity check failed")
        raise ValueError(f"{folder}: the {precision} model is not offered: {reason}")
    if entry.get("offered") is None and entry.get("reason"):  # unchecked (not while being checked)
        logger.warning("%s: the %s model has not passed a retrieval-parity check", folder, precision)
    return precision, entry["file"]


class OnnxQueryEncoder:
    """An exported query encoder run by ONNX Runtime: ``encode(texts) -> float32 [n, dimension]``.

    ``precision``: ``"fp32"`` or ``"int8"`` (default: the export's ``default_precision``); a precision whose
    retrieval-parity check failed is refused. Tokenisation is the saved tokenizer with the export's maximum length,
    exactly as in PyTorch, of each text after the student's query prompt (``query_prompt`` in ``export_info.json``).
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        batch_size: int = 64,
        threads: int | None = None,
        providers: list[str] | None = None,
        spin: bool = False,
        precision: str | None = None,
    ):
        require("serve", "onnxruntime", purpose=f"the ONNX query encoder in {folder}")
        import onnxruntime as ort
        from transformers import AutoTokenizer

        self.folder = Path(folder)
        info_path = self.folder / EXPORT_INFO
        if not info_path.is_file():
            raise FileNotFoundError(f"{self.folder} is not an ONNX export: {EXPORT_INFO} is missing")
        self.info = json.loads(info_path.read_text(encoding="utf-8"))
        self.precision, onnx_file = _onnx_file(self.info, precision, self.folder)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder))
        self.max_length = int(self.info["max_length"])
        self.prompt = str(self.info.get("query_prompt") or "")  # exports made before prompts travelled had none
        self.lean = LeanTokenizer(self.tokenizer, self.max_length)
        self.batch_size = batch_size
        providers = providers or ["CPUExecutionProvider"]
        options = session_options(threads, spin)
        self.session = ort.InferenceSession(str(self.folder / onnx_file), options, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self._mask = "attention_mask" in self.input_names
        self._output = [self.info["output"]]

    @property
    def dimension(self) -> int:
        return int(self.info["dimension"])

    def tokenize(self, texts: list[str]) -> dict[str, np.ndarray]:
        features = self.lean([self.prompt + text for text in texts] if self.prompt else texts, mask=self._mask)
        if "token_type_ids" in self.input_names:  # exports made before the graph took its own token type ids
            features["token_type_ids"] = np.zeros_like(features["input_ids"])
        return features

    def run(self, features: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(self._output, features)[0]

    def encode(self, texts: list[str], batch_size: int | None = None) -> np.ndarray:
        texts = list(texts)
        size = batch_size or self.batch_size
        parts = [self.run(self.tokenize(texts[i : i + size])) for i in range(0, len(texts), size)]
        if not parts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return np.concatenate(parts).astype(np.float32, copy=False)
