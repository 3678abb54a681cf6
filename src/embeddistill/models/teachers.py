"""Teachers and the teacher-embedding cache.

A dual-encoder teacher is any sentence-transformers model (or any Hugging Face encoder, which
sentence-transformers wraps with mean pooling). Its embeddings of every document and query are computed
once and stored on disk: the :class:`EmbeddingCache` is keyed by the teacher's identity (a hash of its
weights plus pooling, normalisation and maximum length), and inside that by a fingerprint of each text, so a
rerun encodes only texts it has not seen. Encoding is written in length-sorted shards, each atomically with
its checksum: an interrupted run resumes from the last finished shard and a corrupt shard is re-encoded.
Shards hold 2048 texts unless ``$EMBEDDISTILL_CACHE_SHARD_SIZE`` says otherwise. Texts are encoded by
:func:`embeddistill.models.encoding.encode_chunks` (the same embeddings as ``SentenceTransformer.encode``, faster).
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from sentence_transformers import SentenceTransformer
from tqdm.auto import tqdm

from embeddistill.models.encoding import DOCUMENT, QUERY, embedding_dimension, encode_chunks
from embeddistill.storage import ShardedCache, fingerprint, read_manifest, text_key, weights_hash
from embeddistill.training import distributed

logger = logging.getLogger(__name__)

CACHE_ENV = "EMBEDDISTILL_CACHE"
SHARD_SIZE_ENV = "EMBEDDISTILL_CACHE_SHARD_SIZE"
DEFAULT_SHARD_SIZE = 2048


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "embeddistill"))


def cache_shard_size() -> int:
    """Texts per cache shard: ``$EMBEDDISTILL_CACHE_SHARD_SIZE`` or 2048.

    A kill loses at most the shard being encoded: smaller shards lose less to a kill but make more files.
    """
    value = os.environ.get(SHARD_SIZE_ENV, "").strip()
    if not value:
        return DEFAULT_SHARD_SIZE
    if not value.isdecimal() or int(value) < 1:
        raise ValueError(f"${SHARD_SIZE_ENV} must be a positive integer, got {value!r}")
    return int(value)


def load_sentence_transformer(name_or_path: str, device: str = "cpu", trust_remote_code: bool = False):
    """Load a sentence-transformers model (or wrap a plain HF encoder), failing clearly on a bad path."""
    looks_local = name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.rstrip("/").split("/", 1)[-1]
    if looks_local and not Path(name_or_path).expanduser().exists():
        raise FileNotFoundError(f"model path {name_or_path!r} does not exist")
    try:
        return SentenceTransformer(name_or_path, device=device, trust_remote_code=trust_remote_code)
    except OSError as error:
        raise FileNotFoundError(
            f"could not load model {name_or_path!r}: not a local folder and not reachable on the Hugging Face hub "
            f"({error.__class__.__name__}: {str(error).splitlines()[0]})"
        ) from None


@dataclass(frozen=True)
class TeacherIdentity:
    """Everything that changes a teacher's embeddings; stored in the cache manifest."""

    name: str
    weights: str
    pooling: str
    normalized: bool
    max_seq_length: int
    dimension: int
    prompts: dict

    @classmethod
    def of(cls, name: str, model: SentenceTransformer) -> TeacherIdentity:
        pooling = next((m.get_config_dict() for m in model.modules() if type(m).__name__ == "Pooling"), {})
        return cls(
            name=name,
            weights=weights_hash(model),
            pooling=json.dumps(pooling, sort_keys=True),
            normalized=is_normalized(model),
            max_seq_length=int(model.max_seq_length or 0),
            dimension=embedding_dimension(model),
            prompts=effective_prompts(model),
        )

    def embedding_settings(self) -> dict:
        """What determines the embeddings: everything but the name (one model may have many paths)."""
        return {k: v for k, v in asdict(self).items() if k != "name"}

    def key(self) -> str:
        return fingerprint(self.embedding_settings())


DOCUMENT_PROMPT_NAMES = ("document", "passage", "corpus")  # what encode_document looks for, in its order
NO_PROMPT = "none"  # --query-prompt none / --document-prompt none: no prompt, whatever the model's config says


def query_prompt(model: SentenceTransformer) -> str:
    """The prompt ``model.encode_query`` puts before a query ("" for none): ``query``, else the default prompt."""
    prompts = getattr(model, "prompts", None) or {}
    name = "query" if "query" in prompts else getattr(model, "default_prompt_name", None)
    return (prompts.get(name) or "") if name else ""


def effective_prompts(model: SentenceTransformer) -> dict:
    """``{"query": ..., "document": ...}``: the prompts ``encode_query`` / ``encode_document`` apply (empty ones left
    out). What the teacher cache is keyed by, so a changed prompt never reuses another prompt's embeddings."""
    prompts = {"query": query_prompt(model), "document": document_prompt(model)}
    return {name: prompt for name, prompt in prompts.items() if prompt}


def set_prompts(model: SentenceTransformer, query: str = "", document: str = "") -> dict:
    """Give ``model`` these query and document prompts ("" keeps the model's own, ``"none"`` removes it).

    The model's prompts become exactly ``effective_prompts`` (other named prompts and the default prompt name are
    dropped), so ``encode_query``, ``encode_document`` and the cache key all see the same two strings.
    """
    prompts = effective_prompts(model)
    for name, given in (("query", query), ("document", document)):
        if given == NO_PROMPT:
            prompts.pop(name, None)
        elif given:
            prompts[name] = given
    model.prompts = prompts
    model.default_prompt_name = None
    return prompts


def truncate_embeddings(model: SentenceTransformer, dimension: int) -> None:
    """Matryoshka truncation: keep the first ``dimension`` values of each embedding and renormalise them.

    Appended as standard sentence-transformers modules (a ``Dense`` whose weights are the first rows of the
    identity, then ``Normalize``), so the truncated teacher, and an asymmetric student's document tower copied from
    it, save and load as plain sentence-transformers models; the weights hash (and so the cache key) changes.
    """
    try:  # sentence-transformers >= 6 moved the modules; 5.x keeps them in `models`
        from sentence_transformers.base.modules import Dense, Normalize
    except ImportError:  # pragma: no cover - depends on the installed version
        from sentence_transformers.models import Dense, Normalize

    full = embedding_dimension(model)
    if not 0 < dimension < full:
        raise ValueError(f"truncate_dim {dimension}: the teacher's embeddings have {full} dimensions (give fewer)")
    dense = Dense(full, dimension, bias=False, activation_function=torch.nn.Identity())
    with torch.no_grad():
        dense.linear.weight.copy_(torch.eye(full)[:dimension])
    device = next(model.parameters()).device
    model.append(dense.to(device))
    model.append(Normalize())


def document_prompt(model: SentenceTransformer) -> str:
    """The prompt ``model.encode_document`` puts before a document ("" for none)."""
    return prompt_for_documents(getattr(model, "prompts", None) or {}, getattr(model, "default_prompt_name", None))


def prompt_for_documents(prompts: dict, default_name: str | None = None) -> str:
    """The document prompt of a ``prompts`` dict, looked up as ``encode_document`` looks it up."""
    name = next((n for n in DOCUMENT_PROMPT_NAMES if n in prompts), default_name)
    return (prompts.get(name) or "") if name else ""


def is_normalized(model: torch.nn.Module) -> bool:
    return any(type(module).__name__ == "Normalize" for module in model.modules())


class EmbeddingCache(ShardedCache):
    """On-disk teacher embeddings, keyed by teacher identity and text fingerprint.

    Layout: ``ROOT/<teacher-slug>-<identity-key>/manifest.json`` and ``shards/NNNNN.{npy,json}``
    (``NNNNN-rR`` when rank R of a torchrun job wrote it); each shard's json lists the text keys of its rows and
    the sha256 of its ``.npy``. Manifest checks, shard verification and writing are :class:`ShardedCache`'s.
    """

    suffix = ".npy"
    identity_field = "teacher"
    what = "teacher"
    redo = "re-encoded"

    def __init__(self, root: str | os.PathLike, identity: TeacherIdentity, shard_size: int = 2048):
        slug = Path(identity.name.rstrip("/")).name.replace("/", "_")
        self.identity = identity
        self.shard_size = shard_size
        manifest = {"teacher": asdict(identity), "format": "embeddistill-embedding-cache/1"}
        super().__init__(Path(root) / f"{slug}-{identity.key()}", manifest, identity.embedding_settings())

    def _comparable(self, stored: dict) -> dict:
        return {k: v for k, v in stored.items() if k != "name"}  # one model may have many paths

    @classmethod
    def find_for_documents(
        cls, root: str | os.PathLike, model: SentenceTransformer, shard_size: int = DEFAULT_SHARD_SIZE
    ) -> EmbeddingCache | None:
        """The cache under ``root`` whose teacher embeds documents exactly as ``model`` does, or None.

        Same weights, pooling, normalisation, maximum length, dimension and document prompt; the name and the query
        prompt may differ. This is how an asymmetric student's document route (the teacher's own tower, saved
        inside the student) finds the documents its teacher's run cached: only its ``document`` rows are to be
        read from the cache it returns.
        """
        wanted = TeacherIdentity.of("", model).embedding_settings()
        wanted_prompt = prompt_for_documents(wanted.pop("prompts"))
        for manifest in sorted(Path(root).expanduser().glob("*/manifest.json")):
            try:  # other caches (cross-encoder scores, generated queries) share the root and have no teacher
                stored = read_manifest(manifest, cls.identity_field)
                identity = TeacherIdentity(**stored)
            except (ValueError, TypeError):
                continue
            settings = identity.embedding_settings()
            if prompt_for_documents(settings.pop("prompts")) == wanted_prompt and settings == wanted:
                return cls(root, identity, shard_size=shard_size)
        return None

    def _serialise(self, payload: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        np.save(buffer, payload, allow_pickle=False)
        return buffer.getvalue()

    def _deserialise(self, data: bytes, rows: int) -> np.ndarray:
        array = np.load(io.BytesIO(data), allow_pickle=False)
        if array.shape != (rows, self.identity.dimension):
            raise ValueError(f"shape {array.shape} does not match {rows} keys")
        return array

    def missing(self, texts: list[str], kind: str) -> list[str]:
        seen: set[str] = set()
        todo = []
        for text in texts:
            key = text_key(f"{kind}\0{text}")
            if key not in self._rows and key not in seen:
                seen.add(key)
                todo.append(text)
        return todo

    def embed(
        self,
        model: SentenceTransformer,
        texts: list[str],
        kind: str,
        batch_size: int = 32,
        desc: str = "",
        compile: bool = False,
    ) -> np.ndarray:
        """Embeddings of ``texts`` (rows in the same order), encoding only what the cache lacks (``compile``: through
        ``torch.compile``, see :func:`~embeddistill.models.kernels.compiled_transformer`)."""
        todo = self.missing(texts, kind)
        if todo:
            logger.info("teacher: encoding %d new %s texts (%d cached)", len(todo), kind, len(texts) - len(todo))
        if distributed.world_size() > 1:  # every rank calls embed with the same texts
            self._encode_sharded(model, todo, kind, batch_size, desc or kind, compile)
        elif todo:
            self._encode(model, todo, kind, batch_size, desc or kind, compile)
        out = np.empty((len(texts), self.identity.dimension), dtype=np.float32)
        for i, text in enumerate(texts):
            shard, row = self._rows[text_key(f"{kind}\0{text}")]
            out[i] = self._shards[shard][row]
        return out

    def _encode_sharded(
        self, model: SentenceTransformer, todo: list[str], kind: str, batch_size: int, desc: str, compile: bool
    ) -> None:
        """torchrun: each rank encodes the texts whose key hashes to it into its own shards (named with its rank),
        then, after a barrier, loads the shards the other ranks wrote. A killed run resumes like a single process:
        finished shards of every rank are reused and the rest is shared out again (by any number of ranks).
        """
        mine = [t for t in todo if distributed.owner(text_key(f"{kind}\0{t}")) == distributed.rank()]
        if mine:
            self._encode(model, mine, kind, batch_size, desc, compile)
        distributed.barrier()
        self._load_shards()

    def _encode(
        self, model: SentenceTransformer, texts: list[str], kind: str, batch_size: int, desc: str, compile: bool
    ) -> None:
        # Longest first: shards of similar length waste no padding, and the ETA is pessimistic early on.
        texts = sorted(texts, key=len, reverse=True)
        chunks = [texts[i : i + self.shard_size] for i in range(0, len(texts), self.shard_size)]
        show = distributed.is_main()  # under torchrun, rank 0's share stands for the progress of all
        with tqdm(total=len(texts), desc=f"teacher {desc}", unit="text", mininterval=2, disable=not show) as bar:
            # The fast path tokenises ahead while the device encodes; every shard is written as it ends.
            arrays = encode_chunks(model, chunks, kind, batch_size, on_batch=bar.update, compile=compile)
            for chunk, array in zip(chunks, arrays, strict=True):
                self.add_shard([text_key(f"{kind}\0{t}") for t in chunk], array)


class CachedTeacherProperties:
    """What every teacher with an embedding cache answers from the cache's identity (local model or endpoint)."""

    cache: EmbeddingCache

    @property
    def dimension(self) -> int:
        return self.cache.identity.dimension

    @property
    def normalized(self) -> bool:
        return self.cache.identity.normalized


@dataclass
class DualEncoderTeacher(CachedTeacherProperties):
    """A dual-encoder teacher with its embedding cache."""

    name: str
    model: SentenceTransformer
    cache: EmbeddingCache
    batch_size: int = 32
    compile: bool = False  # encode through torch.compile (see kernels.compiled_transformer)

    @classmethod
    def load(
        cls,
        name: str,
        cache_dir: str | os.PathLike | None = None,
        device: str = "cpu",
        batch_size: int = 32,
        compile: bool = False,
        max_seq_length: int | None = None,
        trust_remote_code: bool = False,
        query_prompt: str = "",
        document_prompt: str = "",
        truncate_dim: int = 0,
    ) -> DualEncoderTeacher:
        """``query_prompt`` / ``document_prompt`` override the model's own ("none": no prompt), ``truncate_dim``
        keeps the first N dimensions, renormalised (Matryoshka teachers); both are part of the cache key."""
        model = load_sentence_transformer(name, device=device, trust_remote_code=trust_remote_code)
        model.eval()
        if max_seq_length:
            model.max_seq_length = max_seq_length
        prompts = set_prompts(model, query_prompt, document_prompt)
        if prompts:
            logger.info("teacher %s: prompts %s", name, prompts)
        if truncate_dim:
            truncate_embeddings(model, truncate_dim)
        identity = TeacherIdentity.of(name, model)
        cache = EmbeddingCache(cache_dir or default_cache_dir(), identity, shard_size=cache_shard_size())
        logger.info("teacher %s: dim %d, cache %s (%d texts)", name, identity.dimension, cache.dir, len(cache))
        return cls(name=name, model=model, cache=cache, batch_size=batch_size, compile=compile)

    def embed_documents(self, texts: list[str], desc: str = "documents") -> np.ndarray:
        return self.cache.embed(self.model, texts, DOCUMENT, self.batch_size, desc, compile=self.compile)

    def embed_queries(self, texts: list[str], desc: str = "queries") -> np.ndarray:
        return self.cache.embed(self.model, texts, QUERY, self.batch_size, desc, compile=self.compile)
