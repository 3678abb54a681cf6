"""Cross-encoder (CE) teachers: standard CEs, the dual-pooling CE, their score cache, reranking and fine-tuning.

A cross-encoder reads a query and a document together (``[CLS] q [SEP] d [SEP]``) and outputs one relevance score
per pair. Two kinds are supported as teachers (METHOD.md, section 4):

* :class:`CrossEncoderTeacher`: any Hugging Face sequence-classification model, which is also what a
  sentence-transformers ``CrossEncoder`` saves (e.g. ``cross-encoder/ms-marco-MiniLM-L6-v2``). Its score is the raw
  logit (``num_labels == 1``) or the log-odds of the last class over the first (``num_labels == 2``): the
  sigmoid/softmax a ``CrossEncoder`` may apply on ``predict`` is monotone and is left out, so that softmax
  distillation sees the logits. It has scores only, no embeddings.
* :class:`DualPoolingCrossEncoder`: the EmbedDistill scorer. The encoder reads the joint sequence; the output
  token states of the *query segment* (the content tokens before the first separator) are mean-pooled into a query
  embedding ``e_q(q, d)``, those of the *document segment* (content tokens after it) into ``e_d(q, d)``; special
  tokens ([CLS], [SEP], padding) are in neither. Segments come from the tokenizer's special-tokens mask and the
  separator's position, so the same code serves BERT (``token_type_ids``) and RoBERTa-style models (none). With
  ``normalize`` (default) both are L2-normalised and the score is ``s(q, d) = <e_q, e_d>`` (a cosine), trained
  with a softmax temperature ``tau``; without it the score is the plain inner product. Both embeddings are the
  targets of embedding matching for a dual-encoder student. Note that ``e_q`` depends on the document it was
  paired with (and ``e_d`` on the query): :mod:`embeddistill.ce_pipeline` says how targets are formed.

Scores (and dual-pooling embeddings) of (query, document) pairs are computed once and cached on disk by
:class:`CrossEncoderScoreCache`, keyed like the teacher-embedding cache: the CE's identity (a hash of its weights plus
every setting that changes a score) and a fingerprint of each pair. ``embeddistill train-teacher`` fine-tunes a
dual-pooling CE (:func:`train_dual_pooling`); ``embeddistill evaluate --reranker`` reranks a first stage
(:func:`rerank`). Everything is saved as safetensors + JSON; nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load as load_numpy_tensors
from safetensors.numpy import save as save_numpy_tensors
from torch import nn
from tqdm.auto import tqdm

from embeddistill.storage import atomic_write_bytes, atomic_write_json, fingerprint, text_key
from embeddistill.training import forward_context, resolve_device, restore_checkpoint, write_checkpoint

logger = logging.getLogger(__name__)

DUAL_POOLING_CONFIG = "dual_pooling_config.json"
DUAL_POOLING_FORMAT = "embeddistill-dual-pooling-cross-encoder/1"
CACHE_FORMAT = "embeddistill-cross-encoder-cache/1"


# -- segment pooling ---------------------------------------------------------------------------------------------


def segment_masks(attention_mask: torch.Tensor, special_tokens_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks ``(B, L)`` of the query and document segments of ``[CLS] q [SEP] d [SEP]`` (content tokens only).

    A separator is a special token that follows at least one content token; the query segment is the content
    before the first separator, the document segment the content after it. Padding is special as well and masked
    by ``attention_mask``. For BERT this is exactly ``token_type_ids == 0`` / ``== 1`` without [CLS] and [SEP].
    """
    attended = attention_mask.bool()
    special = special_tokens_mask.bool() | ~attended
    content = ~special
    separator = special & (content.long().cumsum(dim=1) > 0)
    segment = separator.long().cumsum(dim=1)
    return content & (segment == 0), content & (segment >= 1)


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``states`` ``(B, L, H)`` over the positions where ``mask`` ``(B, L)`` is true (zero when none)."""
    weights = mask.to(states.dtype).unsqueeze(-1)
    return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


@dataclass
class PairScores:
    """CE outputs for ``N`` pairs: scores ``(N,)`` and, for dual-pooling CEs, ``(N, D)`` segment embeddings."""

    scores: np.ndarray
    query_embeddings: np.ndarray | None = None
    document_embeddings: np.ndarray | None = None


def _length_order(queries: list[str], documents: list[str]) -> np.ndarray:
    """Longest pairs first: batches of similar length waste no padding."""
    return np.argsort([-(len(q) + len(d)) for q, d in zip(queries, documents, strict=True)], kind="stable")


def _weights_hash(module: nn.Module) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _check_local(name_or_path: str) -> None:
    looks_local = name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.rstrip("/").split("/", 1)[-1]
    if looks_local and not Path(name_or_path).expanduser().exists():
        raise FileNotFoundError(f"cross-encoder path {name_or_path!r} does not exist")


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


class _PairScorer:
    """What both CE kinds share: pair tokenization, batched inference, identity."""

    name: str
    tokenizer: object
    max_length: int
    has_embeddings: bool = False

    def _model(self) -> nn.Module:
        raise NotImplementedError

    def _forward(
        self, features: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        raise NotImplementedError

    def settings(self) -> dict:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self._model().parameters()).device

    def tokenize(self, queries: list[str], documents: list[str], device=None) -> dict[str, torch.Tensor]:
        # longest_first trims the longer text first: queries are short, so in practice documents are cut.
        features = self.tokenizer(
            list(queries),
            list(documents),
            padding=True,
            truncation="longest_first",
            max_length=self.max_length,
            return_tensors="pt",
            return_special_tokens_mask=True,
        )
        return {k: v.to(device or self.device) for k, v in features.items()}

    @torch.inference_mode()
    def predict(
        self, queries: list[str], documents: list[str], batch_size: int = 64, show_progress: bool = False
    ) -> PairScores:
        """Scores (and segment embeddings) of the pairs ``(queries[i], documents[i])``, in input order."""
        if len(queries) != len(documents):
            raise ValueError(f"{len(queries)} queries for {len(documents)} documents")
        model = self._model()
        was_training = model.training
        model.eval()
        order = _length_order(queries, documents)
        scores = np.zeros(len(queries), dtype=np.float32)
        dimension = self.dimension if self.has_embeddings else 0
        query_embeddings = np.zeros((len(queries), dimension), dtype=np.float32)
        document_embeddings = np.zeros((len(queries), dimension), dtype=np.float32)
        device = self.device
        with tqdm(
            total=len(order),
            desc=f"cross-encoder {Path(self.name).name}",
            unit="pair",
            mininterval=2,
            disable=not show_progress,
        ) as bar:
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                features = self.tokenize([queries[r] for r in rows], [documents[r] for r in rows], device)
                with _autocast(device):
                    score, query, document = self._forward(features)
                scores[rows] = score.float().cpu().numpy()
                if self.has_embeddings:
                    query_embeddings[rows] = query.float().cpu().numpy()
                    document_embeddings[rows] = document.float().cpu().numpy()
                bar.update(len(rows))
        model.train(was_training)
        if not self.has_embeddings:
            return PairScores(scores)
        return PairScores(scores, query_embeddings, document_embeddings)

    def identity(self) -> dict:
        """Everything that changes this CE's outputs (its name aside): the cache key."""
        return {"weights": _weights_hash(self._model()), "max_length": self.max_length, **self.settings()}

    def encoder_view(self, normalize: bool = True):
        """The CE's encoder as a sentence-transformers dual encoder (mean pooling), for ``--student teacher:N``.

        A student built from it starts from the CE's own bottom layers; it reads one text at a time.
        """
        from sentence_transformers import SentenceTransformer

        from embeddistill.students import Normalize, Pooling, Transformer

        if not Path(self.name).is_dir():
            raise ValueError(f"{self.name!r}: the encoder view needs the cross-encoder as a local folder")
        transformer = Transformer(str(self.name), max_seq_length=self.max_length)
        modules = [transformer, Pooling(transformer.get_word_embedding_dimension(), pooling_mode="mean")]
        if normalize:
            modules.append(Normalize())
        return SentenceTransformer(modules=modules, device=str(self.device))


class CrossEncoderTeacher(_PairScorer):
    """A standard CE: any Hugging Face ``AutoModelForSequenceClassification`` (or sentence-transformers CrossEncoder).

    ``score = logits[:, 0]`` for one label, ``logits[:, -1] - logits[:, 0]`` (log-odds) for two; more labels are an
    error (not a relevance model).
    """

    has_embeddings = False
    default_temperature = 1.0  # logits: softmax over them as they are

    def __init__(self, name: str, model: nn.Module, tokenizer, max_length: int = 512):
        self.name, self.model, self.tokenizer = name, model, tokenizer
        self.max_length = max_length
        labels = int(getattr(model.config, "num_labels", 1))
        if labels not in (1, 2):
            raise ValueError(f"{name}: a relevance cross-encoder has 1 or 2 output labels, this one has {labels}")

    @classmethod
    def load(
        cls, name_or_path: str, device: str = "cpu", max_length: int = 0, trust_remote_code: bool = False
    ) -> CrossEncoderTeacher:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        _check_local(name_or_path)
        try:
            model, loading = AutoModelForSequenceClassification.from_pretrained(
                name_or_path, trust_remote_code=trust_remote_code, output_loading_info=True
            )
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        except OSError as error:
            raise FileNotFoundError(
                f"could not load cross-encoder {name_or_path!r}: {str(error).splitlines()[0]}"
            ) from None
        # An encoder checkpoint (a dual encoder, a dual-pooling CE) loads too, with a freshly *random* classification
        # head that transformers only warns about: its "scores" would be noise. Refuse it.
        prefix = f"{model.base_model_prefix}."
        head = sorted(k for k in loading.get("missing_keys", ()) if not k.startswith(prefix))
        if head:
            raise ValueError(
                f"{name_or_path}: not a sequence-classification cross-encoder, its checkpoint has no trained "
                f"classification head (missing {', '.join(head)}); a dual-pooling cross-encoder folder holds "
                f"{DUAL_POOLING_CONFIG}"
            )
        limit = max_length or min(512, int(getattr(tokenizer, "model_max_length", 512) or 512))
        return cls(name_or_path, model.to(device).eval(), tokenizer, limit)

    @classmethod
    def from_sentence_transformers(cls, cross_encoder, name: str = "") -> CrossEncoderTeacher:
        """Wrap a loaded ``sentence_transformers.CrossEncoder`` (its HF model and tokenizer; raw logits)."""
        max_length = int(getattr(cross_encoder, "max_length", 0) or 512)
        return cls(
            name or str(cross_encoder.config._name_or_path), cross_encoder.model, cross_encoder.tokenizer, max_length
        )

    def _model(self) -> nn.Module:
        return self.model

    def settings(self) -> dict:
        return {"kind": "sequence-classification", "labels": int(self.model.config.num_labels)}

    def _forward(self, features):
        inputs = {k: v for k, v in features.items() if k != "special_tokens_mask"}
        logits = self.model(**inputs).logits.float()
        score = logits[:, 0] if logits.shape[1] == 1 else logits[:, -1] - logits[:, 0]
        return score, None, None


@dataclass
class DualPoolingConfig:
    """Settings of a dual-pooling CE, saved next to its weights as ``dual_pooling_config.json``."""

    normalize: bool = True
    temperature: float = 0.05
    max_length: int = 256
    pooling: str = "mean"
    base_model: str = ""
    format: str = DUAL_POOLING_FORMAT
    training: dict = field(default_factory=dict)


class DualPoolingCrossEncoder(nn.Module, _PairScorer):
    """Dual-pooling CE (EmbedDistill, arXiv 2301.12005, sec. 4.2 / METHOD.md 4): ``s(q, d) = <e_q(q,d), e_d(q,d)>``.

    ``e_q = pool(H[query segment])``, ``e_d = pool(H[document segment])`` over the output token states ``H`` of the
    joint input ``[CLS] q [SEP] d [SEP]`` (mean pooling; L2-normalised when ``normalize``). Training minimises a
    softmax cross-entropy over ``s / tau``.

    +----------------+------------------+---------------------------------------------------------------+
    | input          | shape            | meaning                                                       |
    +================+==================+===============================================================+
    | input_ids      | ``(B, L)`` long  | the joint sequences (``tokenize(queries, documents)``)         |
    | attention_mask | ``(B, L)``       | 1 on real tokens                                              |
    | special_tokens_mask | ``(B, L)``  | 1 on [CLS]/[SEP]/padding: defines the two segments            |
    +----------------+------------------+---------------------------------------------------------------+

    ``forward`` returns ``(scores (B,), e_q (B, H), e_d (B, H))``.
    """

    has_embeddings = True

    def __init__(self, encoder: nn.Module, tokenizer, config: DualPoolingConfig | None = None, name: str = ""):
        nn.Module.__init__(self)
        self.encoder, self.tokenizer = encoder, tokenizer
        self.config = config or DualPoolingConfig()
        if self.config.pooling != "mean":
            raise ValueError(f"dual pooling supports 'mean' pooling, got {self.config.pooling!r}")
        self.name = name

    @property
    def max_length(self) -> int:  # type: ignore[override]
        return self.config.max_length

    @property
    def dimension(self) -> int:
        return int(self.encoder.config.hidden_size)

    @property
    def default_temperature(self) -> float:
        return self.config.temperature

    @classmethod
    def from_encoder(
        cls,
        name_or_path: str,
        normalize: bool = True,
        temperature: float = 0.05,
        max_length: int = 256,
        device: str = "cpu",
        trust_remote_code: bool = False,
    ) -> DualPoolingCrossEncoder:
        """A new dual-pooling CE on any pretrained encoder: a HF / sentence-transformers encoder or a CE checkpoint
        (the classification head of a CE is dropped; its encoder is kept)."""
        from transformers import AutoModel, AutoTokenizer

        _check_local(name_or_path)
        try:
            encoder = AutoModel.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        except OSError as error:
            raise FileNotFoundError(f"could not load encoder {name_or_path!r}: {str(error).splitlines()[0]}") from None
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"{name_or_path}: dual pooling needs a fast tokenizer (special-tokens mask of pairs)")
        config = DualPoolingConfig(normalize, temperature, max_length, base_model=name_or_path)
        model = cls(encoder.float(), tokenizer, config, name=name_or_path)
        return model.to(device)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu", trust_remote_code: bool = False):
        from transformers import AutoModel, AutoTokenizer

        path = Path(path)
        config_path = path / DUAL_POOLING_CONFIG
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path}: not found (not a dual-pooling cross-encoder folder)")
        try:
            values = json.loads(config_path.read_text(encoding="utf-8"))
            config = DualPoolingConfig(**values)
        except (ValueError, TypeError) as error:
            raise ValueError(f"{config_path}: unreadable dual-pooling config ({error})") from None
        if config.format != DUAL_POOLING_FORMAT:
            raise ValueError(f"{config_path}: unknown format {config.format!r} (expected {DUAL_POOLING_FORMAT!r})")
        if not (path / "model.safetensors").is_file():
            raise FileNotFoundError(f"{path / 'model.safetensors'}: weights not found")
        encoder = AutoModel.from_pretrained(str(path), use_safetensors=True, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        return cls(encoder.float(), tokenizer, config, name=str(path)).to(device).eval()

    def save(self, path: str | os.PathLike) -> Path:
        """Weights (safetensors, fp32), HF config, tokenizer and ``dual_pooling_config.json``; the folder is replaced
        only once everything is written (a kill leaves the previous model whole)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.parent / f".{path.name}.saving"
        shutil.rmtree(staging, ignore_errors=True)
        self.encoder.save_pretrained(str(staging), safe_serialization=True)
        self.tokenizer.save_pretrained(str(staging))
        atomic_write_json(staging / DUAL_POOLING_CONFIG, asdict(self.config))
        old = path.parent / f".{path.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            path.rename(old)
        staging.rename(path)
        shutil.rmtree(old, ignore_errors=True)
        self.name = str(path)
        return path

    def _model(self) -> nn.Module:
        return self

    def settings(self) -> dict:
        return {"kind": "dual-pooling", "normalize": self.config.normalize, "pooling": self.config.pooling}

    def embed(self, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled query- and document-segment embeddings ``(B, H)`` each (normalised when configured)."""
        inputs = {k: v for k, v in features.items() if k != "special_tokens_mask"}
        states = self.encoder(**inputs).last_hidden_state
        query_mask, document_mask = segment_masks(features["attention_mask"], features["special_tokens_mask"])
        query, document = masked_mean(states.float(), query_mask), masked_mean(states.float(), document_mask)
        if self.config.normalize:
            query, document = nn.functional.normalize(query, dim=-1), nn.functional.normalize(document, dim=-1)
        return query, document

    def forward(self, features: dict[str, torch.Tensor]):
        query, document = self.embed(features)
        return (query * document).sum(dim=-1), query, document

    def _forward(self, features):
        return self.forward(features)

    def encoder_view(self, normalize: bool | None = None):
        return _PairScorer.encoder_view(self, self.config.normalize if normalize is None else normalize)


def load_cross_encoder(
    name_or_path: str, device: str = "cpu", max_length: int = 0, trust_remote_code: bool = False
) -> CrossEncoderTeacher | DualPoolingCrossEncoder:
    """A dual-pooling CE folder (it holds ``dual_pooling_config.json``) or else any sequence-classification CE."""
    if (Path(name_or_path) / DUAL_POOLING_CONFIG).is_file():
        model = DualPoolingCrossEncoder.load(name_or_path, device=device, trust_remote_code=trust_remote_code)
        if max_length:
            model.config.max_length = max_length
        return model
    return CrossEncoderTeacher.load(name_or_path, device, max_length, trust_remote_code)


# -- the score cache ----------------------------------------------------------------------------------------------


def pair_key(query: str, document: str) -> str:
    return text_key(f"{query}\0{document}")


class CrossEncoderScoreCache:
    """On-disk CE outputs per (query, document) pair, keyed by the CE's identity and a fingerprint of the pair.

    Layout: ``ROOT/ce-<slug>-<identity key>/manifest.json`` and ``shards/NNNNN.{safetensors,json}``; a shard's json
    (written last, atomically) lists its pair keys and the sha256 of its safetensors file, which holds ``scores``
    (float32) and, for dual-pooling CEs, ``query_embeddings`` / ``document_embeddings`` (float16). A corrupt shard
    is dropped with a warning and recomputed; a rerun scores only pairs it has not seen.
    """

    def __init__(self, root: str | os.PathLike, name: str, identity: dict, shard_size: int = 16384):
        slug = Path(name.rstrip("/")).name.replace("/", "_")
        self.identity, self.shard_size = identity, shard_size
        self.dir = Path(root) / f"ce-{slug}-{fingerprint(identity)}"
        self.dir.joinpath("shards").mkdir(parents=True, exist_ok=True)
        manifest = self.dir / "manifest.json"
        if manifest.exists():
            try:
                stored = json.loads(manifest.read_text())["cross_encoder"]
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"{manifest}: unreadable cache manifest ({error!r}); delete the folder") from None
            if stored != identity:
                differ = sorted(k for k in {**stored, **identity} if stored.get(k) != identity.get(k))
                raise ValueError(f"{manifest}: cross-encoder identity differs ({', '.join(differ)}); delete the folder")
        else:
            atomic_write_json(manifest, {"cross_encoder": identity, "name": name, "format": CACHE_FORMAT})
        self._rows: dict[str, tuple[int, int]] = {}
        self._shards: list[dict[str, np.ndarray]] = []
        self._load_shards()

    @classmethod
    def for_model(cls, root: str | os.PathLike, model: _PairScorer) -> CrossEncoderScoreCache:
        return cls(root, model.name, model.identity())

    def _load_shards(self) -> None:
        for meta_path in sorted(self.dir.joinpath("shards").glob("*.json")):
            data_path = meta_path.with_suffix(".safetensors")
            try:
                meta = json.loads(meta_path.read_text())
                data = data_path.read_bytes()
                if hashlib.sha256(data).hexdigest() != meta["sha256"]:
                    raise ValueError("checksum mismatch")
                arrays = load_numpy_tensors(data)
                if arrays["scores"].shape != (len(meta["keys"]),):
                    raise ValueError(f"{arrays['scores'].shape[0]} scores for {len(meta['keys'])} keys")
            except (OSError, ValueError, KeyError, json.JSONDecodeError) as error:
                logger.warning("cross-encoder cache shard %s is corrupt (%s): it will be recomputed", meta_path, error)
                meta_path.unlink(missing_ok=True)
                data_path.unlink(missing_ok=True)
                continue
            index = len(self._shards)
            self._shards.append(arrays)
            for row, key in enumerate(meta["keys"]):
                self._rows.setdefault(key, (index, row))

    def __len__(self) -> int:
        return len(self._rows)

    def _add_shard(self, keys: list[str], outputs: PairScores) -> None:
        arrays = {"scores": outputs.scores.astype(np.float32)}
        if outputs.query_embeddings is not None:
            arrays["query_embeddings"] = outputs.query_embeddings.astype(np.float16)
            arrays["document_embeddings"] = outputs.document_embeddings.astype(np.float16)
        shards = self.dir / "shards"
        number = 1 + max((int(p.stem) for p in shards.glob("*.json")), default=0)
        data = save_numpy_tensors(arrays)
        atomic_write_bytes(shards / f"{number:05d}.safetensors", data)
        atomic_write_json(shards / f"{number:05d}.json", {"keys": keys, "sha256": hashlib.sha256(data).hexdigest()})
        index = len(self._shards)
        self._shards.append(arrays)
        for row, key in enumerate(keys):
            self._rows[key] = (index, row)

    def get(
        self,
        model: _PairScorer,
        queries: list[str],
        documents: list[str],
        batch_size: int = 64,
        embeddings: bool = True,
    ) -> PairScores:
        """Outputs for the pairs ``(queries[i], documents[i])``, computing (and storing) only what is missing."""
        keys = [pair_key(q, d) for q, d in zip(queries, documents, strict=True)]
        todo: dict[str, int] = {}
        for i, key in enumerate(keys):
            if key not in self._rows and key not in todo:
                todo[key] = i
        if todo:
            logger.info("cross-encoder: scoring %d new pairs (%d cached)", len(todo), len(keys) - len(todo))
            pending = list(todo.items())
            with tqdm(total=len(pending), desc="cross-encoder pairs", unit="pair", mininterval=2) as bar:
                for start in range(0, len(pending), self.shard_size):
                    chunk = pending[start : start + self.shard_size]
                    outputs = model.predict(
                        [queries[i] for _, i in chunk], [documents[i] for _, i in chunk], batch_size
                    )
                    self._add_shard([key for key, _ in chunk], outputs)
                    bar.update(len(chunk))
        located = np.array([self._rows[key] for key in keys], dtype=np.int64).reshape(-1, 2)
        scores = np.empty(len(keys), dtype=np.float32)
        has_embeddings = embeddings and model.has_embeddings
        dimension = model.dimension if has_embeddings else 0
        query_embeddings = np.empty((len(keys), dimension), dtype=np.float32) if has_embeddings else None
        document_embeddings = np.empty((len(keys), dimension), dtype=np.float32) if has_embeddings else None
        for shard in np.unique(located[:, 0]) if len(keys) else []:
            at = np.flatnonzero(located[:, 0] == shard)
            rows = located[at, 1]
            arrays = self._shards[shard]
            scores[at] = arrays["scores"][rows]
            if has_embeddings:
                query_embeddings[at] = arrays["query_embeddings"][rows]
                document_embeddings[at] = arrays["document_embeddings"][rows]
        return PairScores(scores, query_embeddings, document_embeddings)


# -- reranking ----------------------------------------------------------------------------------------------------


def rerank(
    model: _PairScorer,
    run: dict[str, dict[str, float]],
    queries: dict[str, str],
    corpus: dict[str, str],
    depth: int = 100,
    batch_size: int = 64,
    cache: CrossEncoderScoreCache | None = None,
) -> dict[str, dict[str, float]]:
    """Rescore each query's top ``depth`` documents of ``run`` with the CE; documents below ``depth`` are dropped."""
    pairs: list[tuple[str, str]] = []
    for query_id, hits in run.items():
        top = sorted(hits.items(), key=lambda item: -item[1])[:depth]
        pairs += [(query_id, doc_id) for doc_id, _ in top]
    query_texts = [queries[q] for q, _ in pairs]
    document_texts = [corpus[d] for _, d in pairs]
    if cache is not None:
        scores = cache.get(model, query_texts, document_texts, batch_size, embeddings=False).scores
    else:
        scores = model.predict(query_texts, document_texts, batch_size, show_progress=True).scores
    reranked: dict[str, dict[str, float]] = {query_id: {} for query_id in run}
    for (query_id, doc_id), score in zip(pairs, scores, strict=True):
        reranked[query_id][doc_id] = float(score)
    return reranked


# -- fine-tuning a dual-pooling CE (``embeddistill train-teacher``) ----------------------------------------------


@dataclass
class TeacherTrainingConfig:
    """Settings of ``embeddistill train-teacher`` (each one a flag)."""

    base: str = ""
    datasets: list[str] = field(default_factory=list)
    split: str = "train"
    out: str = ""
    negatives_from: str = ""
    positives_in_pool: bool = True
    distill_from: str = ""
    distill_weight: float = 1.0
    label_weight: float = 1.0
    group_size: int = 8
    hard_negative_depth: int = 50
    epochs: int = 3
    batch_size: int = 32
    learning_rate: float = 3e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    temperature: float = 0.05
    normalize: bool = True
    max_length: int = 256
    seed: int = 42
    device: str = "auto"
    checkpoint_every: int = 200
    resume: bool = False
    cache_dir: str = ""
    trust_remote_code: bool = False


@dataclass
class TeacherExample:
    """One training query: text, the texts of its positives, and its hard-negative pool."""

    query: str
    positives: list[str]
    negatives: list[str]


def collect_teacher_examples(config: TeacherTrainingConfig, device: str) -> list[TeacherExample]:
    """Labelled queries of every dataset's ``split``, with hard negatives from a dual encoder's top documents.

    Negatives are the first stage's top ``hard_negative_depth`` documents minus every judged-relevant one; without
    ``negatives_from`` they are random corpus documents. With ``positives_in_pool`` (default) a query's positives
    are its judged-relevant documents that the first stage also ranks in its top ``hard_negative_depth + 50`` (all of
    them where it ranks none): positives and negatives then come from the same (reranking) distribution. Without
    it, on collections with many weak judgements (NFCorpus: about 40 per query, most of them far from the query)
    the positive is usually a document the first stage ranks low and every negative one it ranks high, and the CE
    learns to prefer what the first stage does not: it reranked NFCorpus at the level of a random order
    (``benchmarks/results/cross_encoder.json``).
    """
    from embeddistill.data import RetrievalDataset
    from embeddistill.indexing import FlatIndex
    from embeddistill.teachers import DualEncoderTeacher

    first_stage = None
    if config.negatives_from:
        first_stage = DualEncoderTeacher.load(config.negatives_from, cache_dir=config.cache_dir or None, device=device)
    examples: list[TeacherExample] = []
    rng = random.Random(config.seed)
    for name in config.datasets:
        dataset = RetrievalDataset.load(name)
        qrels = dataset.qrels(config.split)
        query_ids = sorted(qrels)
        doc_ids = list(dataset.corpus)
        if first_stage is not None:
            documents = first_stage.embed_documents([dataset.corpus[d] for d in doc_ids], desc=f"{name} corpus")
            queries = first_stage.embed_queries([dataset.queries[q] for q in query_ids], desc=f"{name} queries")
            _, top = FlatIndex(documents, doc_ids).search(queries, config.hard_negative_depth + 50)
        for i, query_id in enumerate(query_ids):
            relevant = {d for d, rel in qrels[query_id].items() if rel > 0}
            if not relevant:
                continue
            if first_stage is not None:
                pool = [doc_ids[r] for r in top[i] if r >= 0 and doc_ids[r] not in relevant]
            else:
                pool = [d for d in rng.sample(doc_ids, min(len(doc_ids), 4 * config.group_size)) if d not in relevant]
            pool = pool[: config.hard_negative_depth]
            if not pool:
                continue
            positives = sorted(relevant)
            if first_stage is not None and config.positives_in_pool:
                found = [doc_ids[r] for r in top[i] if r >= 0 and doc_ids[r] in relevant]
                positives = found or positives
            examples.append(
                TeacherExample(
                    dataset.queries[query_id],
                    [dataset.corpus[d] for d in positives],
                    [dataset.corpus[d] for d in pool],
                )
            )
        logger.info("train-teacher: %s: %d training queries", name, len(query_ids))
    if not examples:
        raise ValueError("train-teacher: no labelled training queries with negatives in " + ", ".join(config.datasets))
    return examples


class DualPoolingTrainer:
    """Fine-tunes a :class:`DualPoolingCrossEncoder` on groups ``[positive, negatives...]`` per query.

    Loss per step (``B`` queries, ``G`` documents each, column 0 the positive):
    ``w_label * LabelLoss(s / tau)`` (softmax cross-entropy against the positive), plus, with a standard CE to
    distil (``distill_from``), ``w_distill * ScoreDistillationLoss`` between its logits (temperature 1) and ``s``
    (temperature ``tau``). Epoch ``e`` draws, for every query, one positive and ``G - 1`` negatives from its pool,
    seeded by ``(seed, e)``. Checkpoints (safetensors + JSON) every ``checkpoint_every`` steps make ``--resume``
    continue where a run stopped.
    """

    def __init__(
        self,
        model: DualPoolingCrossEncoder,
        examples: list[TeacherExample],
        config: TeacherTrainingConfig,
        distill_teacher: CrossEncoderTeacher | None = None,
    ):
        from embeddistill.losses import LabelLoss, ScoreDistillationLoss

        self.model, self.examples, self.config = model, examples, config
        self.device = resolve_device(config.device)
        self.model.to(self.device)
        self.distill_teacher = distill_teacher
        self.label_loss = LabelLoss(config.temperature if config.normalize else 1.0)
        self.distill_loss = ScoreDistillationLoss(1.0, config.temperature if config.normalize else 1.0)
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=config.learning_rate,
            weight_decay=config.weight_decay,
        )
        self.steps_per_epoch = math.ceil(len(examples) / config.batch_size)
        self.total_steps = self.steps_per_epoch * config.epochs
        self.out = Path(config.out)
        self.checkpoint_dir = self.out.parent / f"{self.out.name}.checkpoint"
        self.log_path = self.out.parent / f"{self.out.name}.train_log.jsonl"

    def learning_rate(self, step: int) -> float:
        warmup = max(1, int(self.config.warmup_ratio * self.total_steps))
        if step < warmup:
            return self.config.learning_rate * (step + 1) / warmup
        return self.config.learning_rate * max(0.0, (self.total_steps - step) / max(1, self.total_steps - warmup))

    def batch(self, step: int) -> tuple[list[str], list[str], int]:
        """Query and document texts (each query repeated ``G`` times, positive first) of one step, and ``G``."""
        epoch, position = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.config.seed, epoch]).permutation(len(self.examples))
        rows = order[position * self.config.batch_size : (position + 1) * self.config.batch_size]
        rng = np.random.default_rng([self.config.seed, epoch, position])
        group = self.config.group_size
        queries, documents = [], []
        for row in rows:
            example = self.examples[row]
            negatives = [example.negatives[i] for i in rng.permutation(len(example.negatives))[: group - 1]]
            while len(negatives) < group - 1:  # a short pool repeats itself rather than changing the group size
                negatives.append(example.negatives[len(negatives) % len(example.negatives)])
            positive = example.positives[int(rng.integers(len(example.positives)))]
            queries += [example.query] * group
            documents += [positive, *negatives]
        return queries, documents, group

    def step(self, step: int) -> dict[str, float]:
        queries, documents, group = self.batch(step)
        features = self.model.tokenize(queries, documents, self.device)
        with forward_context(self.device, bf16=self.device.type == "cuda"):
            scores = self.model(features)[0].float().view(-1, group)
        targets = torch.zeros(scores.shape[0], dtype=torch.long, device=self.device)
        parts = {"label": self.label_loss(scores, targets)}
        if self.distill_teacher is not None:
            teacher = self.distill_teacher.predict(queries, documents, batch_size=len(queries)).scores
            teacher_scores = torch.from_numpy(teacher).to(self.device).view(-1, group)
            parts["distill"] = self.distill_loss(scores, teacher_scores)
        loss = self.config.label_weight * parts["label"] + self.config.distill_weight * parts.get("distill", 0.0)
        for group_ in self.optimizer.param_groups:
            group_["lr"] = self.learning_rate(step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        return {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in parts.items()}}

    def train(self) -> dict:
        torch.manual_seed(self.config.seed)
        start = self._resume() if self.config.resume else 0
        if not self.config.resume:
            self.log_path.unlink(missing_ok=True)
        self.model.train()
        started = time.perf_counter()
        running: dict[str, float] = {}
        bar = tqdm(
            range(start, self.total_steps), desc="train-teacher", unit="step", initial=start, total=self.total_steps
        )
        for step in bar:
            parts = self.step(step)
            running = {k: 0.9 * running.get(k, v) + 0.1 * v for k, v in parts.items()}
            bar.set_postfix({k: f"{v:.4f}" for k, v in running.items()}, refresh=False)
            if step % 10 == 0 or step == self.total_steps - 1:
                with open(self.log_path, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps({"step": step, "lr": self.learning_rate(step), **parts}) + "\n")
            done = step + 1
            if self.config.checkpoint_every and done % self.config.checkpoint_every == 0 and done < self.total_steps:
                self.save_checkpoint(done)
        self.model.eval()
        return {
            "steps": self.total_steps,
            "resumed_from_step": start,
            "train_seconds": time.perf_counter() - started,
            "queries": len(self.examples),
        }

    def save_checkpoint(self, step: int) -> None:
        write_checkpoint(self.checkpoint_dir, step, self.model, self.optimizer)
        logger.info("train-teacher: checkpoint at step %d -> %s", step, self.checkpoint_dir)

    def _resume(self) -> int:
        step = restore_checkpoint(self.checkpoint_dir, self.model, self.optimizer, self.device)
        if step:
            logger.info("train-teacher: resumed from step %d", step)
        return step


def train_dual_pooling(config: TeacherTrainingConfig) -> tuple[DualPoolingCrossEncoder, dict]:
    """``embeddistill train-teacher``: fine-tune a dual-pooling CE and save it to ``config.out``."""
    if not config.base or not config.datasets or not config.out:
        raise ValueError("train-teacher needs --base, --dataset and --out")
    if config.group_size < 2:
        raise ValueError(f"--group-size must be at least 2 (a positive and a negative), got {config.group_size}")
    device = str(resolve_device(config.device))
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    if (Path(config.base) / DUAL_POOLING_CONFIG).is_file():
        model = DualPoolingCrossEncoder.load(config.base, device, config.trust_remote_code)
        model.config.temperature, model.config.max_length = config.temperature, config.max_length
        model.config.normalize = config.normalize
    else:
        model = DualPoolingCrossEncoder.from_encoder(
            config.base, config.normalize, config.temperature, config.max_length, device, config.trust_remote_code
        )
    distill_teacher = None
    if config.distill_from:
        distill_teacher = CrossEncoderTeacher.load(
            config.distill_from, device, config.max_length, config.trust_remote_code
        )
    examples = collect_teacher_examples(config, device)
    trainer = DualPoolingTrainer(model, examples, config, distill_teacher)
    info = trainer.train()
    model.config.base_model = config.base
    model.config.training = {**{k: v for k, v in asdict(config).items() if k not in ("resume",)}, **info}
    model.save(config.out)
    logger.info("train-teacher: saved %s (%d steps, %.0f s)", config.out, info["steps"], info["train_seconds"])
    return model, info
