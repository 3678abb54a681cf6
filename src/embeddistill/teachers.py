"""Teachers and the teacher-embedding cache.

A dual-encoder teacher is any sentence-transformers model (or any Hugging Face encoder, which
sentence-transformers wraps with mean pooling). Its embeddings of every document and query are computed
once and stored on disk: the :class:`EmbeddingCache` is keyed by the teacher's identity (a hash of its
weights plus pooling, normalisation and maximum length), and inside that by a fingerprint of each text, so a
rerun encodes only texts it has not seen. Encoding is written in length-sorted shards, each atomically with
its checksum: an interrupted run resumes from the last finished shard and a corrupt shard is re-encoded.
Shards hold 2048 texts unless ``$EMBEDDISTILL_CACHE_SHARD_SIZE`` says otherwise. Texts are encoded by
:func:`embeddistill.encoding.encode_chunks` (the same embeddings as ``SentenceTransformer.encode``, faster).
"""

from __future__ import annotations

import hashlib
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

from embeddistill import distributed
from embeddistill.encoding import DOCUMENT, QUERY, encode_chunks
from embeddistill.storage import atomic_save_npy, atomic_write_json, fingerprint, text_key

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


def weights_hash(model: torch.nn.Module) -> str:
    """A hash of every parameter and buffer: two teachers with equal hashes embed identically."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


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
            dimension=int(model.get_sentence_embedding_dimension()),
            prompts=dict(getattr(model, "prompts", {}) or {}),
        )

    def embedding_settings(self) -> dict:
        """What determines the embeddings: everything but the name (one model may have many paths)."""
        return {k: v for k, v in asdict(self).items() if k != "name"}

    def key(self) -> str:
        return fingerprint(self.embedding_settings())


def is_normalized(model: torch.nn.Module) -> bool:
    return any(type(module).__name__ == "Normalize" for module in model.modules())


class EmbeddingCache:
    """On-disk teacher embeddings, keyed by teacher identity and text fingerprint.

    Layout: ``ROOT/<teacher-slug>-<identity-key>/manifest.json`` and ``shards/NNNNN.{npy,json}``
    (``NNNNN-rR`` when rank R of a torchrun job wrote it); each shard's json lists the text keys of its rows and
    the sha256 of its ``.npy``.
    """

    def __init__(self, root: str | os.PathLike, identity: TeacherIdentity, shard_size: int = 2048):
        slug = Path(identity.name.rstrip("/")).name.replace("/", "_")
        self.dir = Path(root) / f"{slug}-{identity.key()}"
        self.identity = identity
        self.shard_size = shard_size
        self.dir.joinpath("shards").mkdir(parents=True, exist_ok=True)
        manifest = self.dir / "manifest.json"
        if manifest.exists():
            try:
                stored = {k: v for k, v in json.loads(manifest.read_text())["teacher"].items() if k != "name"}
            except (ValueError, KeyError, TypeError, AttributeError) as error:
                raise ValueError(f"{manifest}: unreadable cache manifest ({error!r}); delete the folder") from None
            settings = identity.embedding_settings()
            if stored != settings:
                differ = sorted(k for k in {**stored, **settings} if stored.get(k) != settings.get(k))
                raise ValueError(
                    f"{manifest}: teacher identity does not match this cache folder ({', '.join(differ)} differ); "
                    "delete the folder"
                )
        else:
            atomic_write_json(manifest, {"teacher": asdict(identity), "format": "embeddistill-embedding-cache/1"})
        self._rows: dict[str, tuple[int, int]] = {}
        self._shards: list[np.ndarray] = []
        self._loaded: set[str] = set()  # shard names already in memory
        self._load_shards()

    def _load_shards(self) -> None:
        for meta_path in sorted(self.dir.joinpath("shards").glob("*.json")):
            if meta_path.stem in self._loaded:
                continue
            array_path = meta_path.with_suffix(".npy")
            try:
                meta = json.loads(meta_path.read_text())
                data = array_path.read_bytes()
                if hashlib.sha256(data).hexdigest() != meta["sha256"]:
                    raise ValueError("checksum mismatch")
                array = np.load(io.BytesIO(data), allow_pickle=False)
                if array.shape != (len(meta["keys"]), self.identity.dimension):
                    raise ValueError(f"shape {array.shape} does not match {len(meta['keys'])} keys")
            except (OSError, ValueError, KeyError, json.JSONDecodeError) as error:
                logger.warning("cache shard %s is corrupt (%s): it will be re-encoded", meta_path.stem, error)
                meta_path.unlink(missing_ok=True)
                array_path.unlink(missing_ok=True)
                continue
            index = len(self._shards)
            self._shards.append(array)
            self._loaded.add(meta_path.stem)
            for row, key in enumerate(meta["keys"]):
                self._rows.setdefault(key, (index, row))  # a key in two shards is kept once

    def __len__(self) -> int:
        return len(self._rows)

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
        self, model: SentenceTransformer, texts: list[str], kind: str, batch_size: int = 32, desc: str = ""
    ) -> np.ndarray:
        """Embeddings of ``texts`` (rows in the same order), encoding only what the cache lacks."""
        todo = self.missing(texts, kind)
        if todo:
            logger.info("teacher: encoding %d new %s texts (%d cached)", len(todo), kind, len(texts) - len(todo))
        if distributed.world_size() > 1:  # every rank calls embed with the same texts
            self._encode_sharded(model, todo, kind, batch_size, desc or kind)
        elif todo:
            self._encode(model, todo, kind, batch_size, desc or kind)
        out = np.empty((len(texts), self.identity.dimension), dtype=np.float32)
        for i, text in enumerate(texts):
            shard, row = self._rows[text_key(f"{kind}\0{text}")]
            out[i] = self._shards[shard][row]
        return out

    def _encode_sharded(
        self, model: SentenceTransformer, todo: list[str], kind: str, batch_size: int, desc: str
    ) -> None:
        """torchrun: each rank encodes the texts whose key hashes to it into its own shards (named with its rank),
        then, after a barrier, loads the shards the other ranks wrote. A killed run resumes like a single process:
        finished shards of every rank are reused and the rest is shared out again (by any number of ranks).
        """
        mine = [t for t in todo if distributed.owner(text_key(f"{kind}\0{t}")) == distributed.rank()]
        if mine:
            self._encode(model, mine, kind, batch_size, desc)
        distributed.barrier()
        self._load_shards()

    def _encode(self, model: SentenceTransformer, texts: list[str], kind: str, batch_size: int, desc: str) -> None:
        # Longest first: shards of similar length waste no padding, and the ETA is pessimistic early on.
        texts = sorted(texts, key=len, reverse=True)
        chunks = [texts[start : start + self.shard_size] for start in range(0, len(texts), self.shard_size)]
        show = distributed.is_main()  # under torchrun, rank 0's share stands for the progress of all
        with tqdm(total=len(texts), desc=f"teacher {desc}", unit="text", mininterval=2, disable=not show) as bar:
            # The fast path tokenises the next shard while this one is encoded; every shard is written as it ends.
            arrays = encode_chunks(model, chunks, kind, batch_size, on_batch=bar.update)
            for chunk, array in zip(chunks, arrays, strict=True):
                self._add_shard([text_key(f"{kind}\0{t}") for t in chunk], array)

    def _add_shard(self, keys: list[str], array: np.ndarray) -> None:
        shards = self.dir / "shards"
        number = 1 + max((int(p.stem.split("-")[0]) for p in shards.glob("*.json")), default=0)
        # Under torchrun all ranks write into this folder at once: the rank in the name keeps their shards apart.
        name = f"{number:05d}" if distributed.world_size() == 1 else f"{number:05d}-r{distributed.rank()}"
        checksum = atomic_save_npy(shards / f"{name}.npy", array)
        # The json is written last: a shard without it is ignored, so a kill between the two loses nothing.
        atomic_write_json(shards / f"{name}.json", {"keys": keys, "sha256": checksum})
        index = len(self._shards)
        self._shards.append(array)
        self._loaded.add(name)
        for row, key in enumerate(keys):
            self._rows[key] = (index, row)


@dataclass
class DualEncoderTeacher:
    """A dual-encoder teacher with its embedding cache."""

    name: str
    model: SentenceTransformer
    cache: EmbeddingCache
    batch_size: int = 32

    @classmethod
    def load(
        cls,
        name: str,
        cache_dir: str | os.PathLike | None = None,
        device: str = "cpu",
        batch_size: int = 32,
        max_seq_length: int | None = None,
        trust_remote_code: bool = False,
    ) -> DualEncoderTeacher:
        model = load_sentence_transformer(name, device=device, trust_remote_code=trust_remote_code)
        model.eval()
        if max_seq_length:
            model.max_seq_length = max_seq_length
        identity = TeacherIdentity.of(name, model)
        cache = EmbeddingCache(cache_dir or default_cache_dir(), identity, shard_size=cache_shard_size())
        logger.info("teacher %s: dim %d, cache %s (%d texts)", name, identity.dimension, cache.dir, len(cache))
        return cls(name=name, model=model, cache=cache, batch_size=batch_size)

    @property
    def dimension(self) -> int:
        return self.cache.identity.dimension

    @property
    def normalized(self) -> bool:
        return self.cache.identity.normalized

    def embed_documents(self, texts: list[str], desc: str = "documents") -> np.ndarray:
        return self.cache.embed(self.model, texts, DOCUMENT, self.batch_size, desc)

    def embed_queries(self, texts: list[str], desc: str = "queries") -> np.ndarray:
        return self.cache.embed(self.model, texts, QUERY, self.batch_size, desc)
