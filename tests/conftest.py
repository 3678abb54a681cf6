"""Fixtures shared by the whole test suite (offline: nothing here touches the network or the model hub).

* ``tiny_teacher_path`` (session): a random 4-layer, 32-d BERT saved as a sentence-transformers model
  (Transformer(max_seq_length=64) -> mean Pooling -> Normalize) with the real all-MiniLM-L6-v2 tokenizer.
  It is a ``str`` (what ``DualEncoderTeacher.load`` and ``ModelConfig.teacher`` expect).
* ``scifact_slice`` (session): a ``Path`` to a small real BEIR folder: the first 300 SciFact documents, the
  train and test queries judged on them, and ``qrels/{train,test}.tsv`` restricted to them.
* ``cache_dir``: a fresh ``Path`` (``tmp_path / "cache"``, not yet created) for teacher-embedding caches.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
MINILM_FOLDER = "all-MiniLM-L6-v2"
SCIFACT_DOCUMENTS = 300


def _minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder: from ``shared/models/get-models minilm`` beside the checkout, else
    $EMBEDDISTILL_MODELS or ~/.cache/embeddistill-models, else (online) its tokenizer and config from the hub."""
    tried: list[str] = []
    script = SHARED / "models" / "get-models"
    if script.exists():
        try:
            result = subprocess.run([str(script), "minilm"], capture_output=True, text=True, timeout=600, check=False)
            for line in result.stdout.splitlines():
                name, _, path = line.partition("\t")
                if name == "minilm" and (Path(path) / "tokenizer_config.json").exists():
                    return Path(path)
            tried.append(f"{script} minilm (exit {result.returncode}: {result.stderr.strip()[-300:]})")
        except (OSError, subprocess.TimeoutExpired) as error:
            tried.append(f"{script} minilm ({error})")
    else:
        tried.append(f"{script} (missing)")
    roots = [os.environ.get("EMBEDDISTILL_MODELS"), str(Path.home() / ".cache" / "embeddistill-models")]
    for root in filter(None, roots):
        candidate = Path(root) / MINILM_FOLDER
        if (candidate / "tokenizer_config.json").exists():
            return candidate
        tried.append(str(candidate))
    if os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes"):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(f"sentence-transformers/{MINILM_FOLDER}", allow_patterns=["*.json", "*.txt"]))
        except Exception as error:  # no network, no such repository: say so with the rest
            tried.append(f"the hub ({type(error).__name__}: {str(error)[:200]})")
    raise RuntimeError("the all-MiniLM-L6-v2 tokenizer is needed for the tiny teacher; tried:\n  " + "\n  ".join(tried))


def _scifact_folder() -> Path:
    """SciFact in the BEIR layout: ``shared/datasets/scifact`` beside the checkout, else (online) the hub's, through
    the library's own loader (converted once into ~/.cache/embeddistill/datasets/scifact)."""
    local = SHARED / "datasets" / "scifact"
    if (local / "corpus.jsonl").exists():
        return local
    from embeddistill.data import resolve_dataset

    return resolve_dataset("scifact")


def _sentence_transformer_modules():
    try:  # sentence-transformers >= 6
        from sentence_transformers.base.modules import Normalize, Transformer
        from sentence_transformers.sentence_transformer.modules import Pooling
    except ImportError:  # 5.x
        from sentence_transformers.models import Normalize, Pooling, Transformer
    return Transformer, Pooling, Normalize


def build_tiny_teacher(folder: Path, seed: int = 0, max_seq_length: int = 64, hidden_size: int = 32) -> str:
    """Save a tiny random BERT sentence-transformers model into ``folder``; return the path as a string."""
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer

    Transformer, Pooling, Normalize = _sentence_transformer_modules()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(_minilm_path()))
    config = transformers.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    hf_folder = folder / "hf"
    transformers.BertModel(config).save_pretrained(hf_folder)
    tokenizer.save_pretrained(hf_folder)
    transformer = Transformer(str(hf_folder), max_seq_length=max_seq_length)
    pooling = Pooling(hidden_size, pooling_mode="mean")
    model = SentenceTransformer(modules=[transformer, pooling, Normalize()], device="cpu")
    out = folder / "tiny-teacher"
    model.save(str(out))
    return str(out)


@pytest.fixture(scope="session")
def tiny_teacher_path(tmp_path_factory) -> str:
    return build_tiny_teacher(tmp_path_factory.mktemp("tiny-teacher"))


@pytest.fixture(scope="session")
def tiny_student_path(tmp_path_factory) -> str:
    """A different tiny model, narrower than the teacher (16-d), so a student built from it needs a projection."""
    return build_tiny_teacher(tmp_path_factory.mktemp("tiny-student"), seed=1, hidden_size=16)


@pytest.fixture(scope="session")
def scifact_slice(tmp_path_factory) -> Path:
    source = _scifact_folder()
    out = tmp_path_factory.mktemp("scifact-slice") / "scifact"
    (out / "qrels").mkdir(parents=True)

    document_lines = [line for line in (source / "corpus.jsonl").read_text(encoding="utf-8").splitlines() if line]
    document_lines = document_lines[:SCIFACT_DOCUMENTS]
    document_ids = {json.loads(line)["_id"] for line in document_lines}
    (out / "corpus.jsonl").write_text("\n".join(document_lines) + "\n", encoding="utf-8")

    judged: set[str] = set()
    for split in ("train", "test"):
        lines = (source / "qrels" / f"{split}.tsv").read_text(encoding="utf-8").splitlines()
        header, rows = lines[0], [line for line in lines[1:] if line.strip()]
        kept = [row for row in rows if row.split("\t")[1] in document_ids]
        assert kept, f"no {split} qrels point into the first {SCIFACT_DOCUMENTS} SciFact documents"
        judged.update(row.split("\t")[0] for row in kept)
        (out / "qrels" / f"{split}.tsv").write_text("\n".join([header, *kept]) + "\n", encoding="utf-8")

    query_lines = [
        line
        for line in (source / "queries.jsonl").read_text(encoding="utf-8").splitlines()
        if line and json.loads(line)["_id"] in judged
    ]
    (out / "queries.jsonl").write_text("\n".join(query_lines) + "\n", encoding="utf-8")
    return out


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"
