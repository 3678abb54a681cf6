"""Cross-encoder (CE) teachers: standard CEs, the dual-pooling CE, their score cache, reranking and fine-tuning.

A cross-encoder reads a query and a document together (``[CLS] q [SEP] d [SEP]``) and outputs one relevance score
per pair. Two kinds are supported as teachers (docs/METHOD.md, section 4):

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
  paired with (and ``e_d`` on the query): :mod:`embeddistill.pipeline.cross_encoder` says how targets are formed.

Scores (and dual-pooling embeddings) of (query, document) pairs are computed once and cached on disk by
:class:`CrossEncoderScoreCache`, keyed like the teacher-embedding cache: the CE's identity (a hash of its weights plus
every setting that changes a score) and a fingerprint of each pair. ``embeddistill train-teacher`` fine-tunes a
dual-pooling CE (:func:`train_cross_encoder`); ``embeddistill evaluate --reranker`` reranks a first stage
(:func:`rerank`). Everything is saved as safetensors + JSON; nothing is ever unpickled.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load as load_numpy_tensors
from safetensors.numpy import save as save_numpy_tensors
from torch import nn
from tqdm.auto import tqdm

from embeddistill.models.pooling import masked_mean, segment_masks
from embeddistill.storage import ShardedCache, atomic_write_json, fingerprint, replace_folder, text_key, weights_hash

logger = logging.getLogger(__name__)

DUAL_POOLING_CONFIG = "dual_pooling_config.json"
DUAL_POOLING_FORMAT = "embeddistill-dual-pooling-cross-encoder/1"
CACHE_FORMAT = "embeddistill-cross-encoder-cache/1"


@dataclass
class PairScores:
    """CE outputs for ``N`` pairs: scores ``(N,)`` and, for dual-pooling CEs, ``(N, D)`` segment embeddings."""

    scores: np.ndarray
    query_embeddings: np.ndarray | None = None
    document_embeddings: np.ndarray | None = None


def _length_order(queries: list[str], documents: list[str]) -> np.ndarray:
    """Longest pairs first: batches of similar length waste no padding."""
    return np.argsort([-(len(q) + len(d)) for q, d in zip(queries, documents, strict=True)], kind="stable")


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
        return {"weights": weights_hash(self._model()), "max_length": self.max_length, **self.settings()}

    def encoder_view(self, normalize: bool = True):
        """The CE's encoder as a sentence-transformers dual encoder (mean pooling), for ``--student teacher:N``.

        A student built from it starts from the CE's own bottom layers; it reads one text at a time.
        """
        from sentence_transformers import SentenceTransformer

        from embeddistill.models.students import Normalize, Pooling, Transformer

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
    """Dual-pooling CE (EmbedDistill, arXiv 2301.12005, sec. 4.2; docs/METHOD.md 4): ``s(q, d) = <e_q(q,d), e_d(q,d)>``.

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

        def write(staging: Path) -> None:
            self.encoder.save_pretrained(str(staging), safe_serialization=True)
            self.tokenizer.save_pretrained(str(staging))
            atomic_write_json(staging / DUAL_POOLING_CONFIG, asdict(self.config))

        path = replace_folder(path, write)  # transformers writes the weights 0600: the modes are fixed there
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


class CrossEncoderScoreCache(ShardedCache):
    """On-disk CE outputs per (query, document) pair, keyed by the CE's identity and a fingerprint of the pair.

    Layout: ``ROOT/ce-<slug>-<identity key>/manifest.json`` and ``shards/NNNNN.{safetensors,json}``; a shard's json
    (written last, atomically) lists its pair keys and the sha256 of its safetensors file, which holds ``scores``
    (float32) and, for dual-pooling CEs, ``query_embeddings`` / ``document_embeddings`` (float16). A corrupt shard
    is dropped with a warning and recomputed; a rerun scores only pairs it has not seen (:class:`ShardedCache`).
    """

    suffix = ".safetensors"
    identity_field = "cross_encoder"
    what = "cross-encoder"
    redo = "recomputed"

    def __init__(self, root: str | os.PathLike, name: str, identity: dict, shard_size: int = 16384):
        slug = Path(name.rstrip("/")).name.replace("/", "_")
        self.identity, self.shard_size = identity, shard_size
        manifest = {"cross_encoder": identity, "name": name, "format": CACHE_FORMAT}
        super().__init__(Path(root) / f"ce-{slug}-{fingerprint(identity)}", manifest, identity)

    @classmethod
    def for_model(cls, root: str | os.PathLike, model: _PairScorer) -> CrossEncoderScoreCache:
        return cls(root, model.name, model.identity())

    def _serialise(self, payload: PairScores) -> bytes:
        arrays = {"scores": payload.scores.astype(np.float32)}
        if payload.query_embeddings is not None:
            arrays["query_embeddings"] = payload.query_embeddings.astype(np.float16)
            arrays["document_embeddings"] = payload.document_embeddings.astype(np.float16)
        return save_numpy_tensors(arrays)

    def _deserialise(self, data: bytes, rows: int) -> dict[str, np.ndarray]:
        arrays = load_numpy_tensors(data)
        if arrays["scores"].shape != (rows,):
            raise ValueError(f"{arrays['scores'].shape[0]} scores for {rows} keys")
        return arrays

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
                    self.add_shard([key for key, _ in chunk], outputs)
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
