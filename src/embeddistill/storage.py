"""Atomic, checksummed file writes and the sharded cache: nothing a long job computed is lost or left half-written.

:class:`ShardedCache` is the one on-disk cache of model outputs (teacher embeddings, cross-encoder scores); the
LM query cache (:mod:`embeddistill.querygen.lm`) shares its manifest checks (:func:`read_manifest`,
:func:`check_settings`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask (reading it means setting it: the lock keeps two threads from racing)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file: 0644 under umask 022."""
    return 0o666 & ~current_umask()


def folder_mode() -> int:
    """The mode ``mkdir`` would give a new folder: 0755 under umask 022."""
    return 0o777 & ~current_umask()


def private_temp_file(folder: Path, name: str) -> tuple[int, str]:
    """``mkstemp`` in ``folder`` for a file that will become ``name``, with the mode an ordinary file would get
    (``mkstemp`` alone creates 0600, and the rename would carry that to a result file other users must read)."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    os.fchmod(fd, file_mode())
    return fd, tmp


def honour_umask(folder: str | os.PathLike) -> None:
    """Give every file and folder under ``folder`` the mode the umask allows (0644 / 0755 under umask 022).

    For folders written by other libraries: transformers writes ``model.safetensors`` through a 0600 temporary file,
    which would leave a saved model unreadable to every other user.
    """
    files, folders = file_mode(), folder_mode()
    for root, _subfolders, names in os.walk(folder):
        os.chmod(root, folders)
        for name in names:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, files)


def replace_folder(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Let ``write`` fill a staging folder beside ``path``, then put it in ``path``'s place: a kill at any point
    leaves the previous folder whole (or none). Modes follow the umask (see :func:`honour_umask`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging, old = path.parent / f".{path.name}.saving", path.parent / f".{path.name}.old"
    shutil.rmtree(staging, ignore_errors=True)
    write(staging)
    honour_umask(staging)
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    staging.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    A reader (or a rerun after ``kill -9``) sees either the old file or the complete new one. The file gets the
    mode an ordinary write would give it (the umask's), not ``mkstemp``'s 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = private_temp_file(path.parent, path.name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> str:
    """Save ``array`` as ``.npy`` atomically and return the file's sha256 (for manifests)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    data = buffer.getvalue()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def text_key(text: str) -> str:
    """A short stable fingerprint of one text, used to key cached embeddings."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=12).hexdigest()


def fingerprint(items: Any) -> str:
    """A stable fingerprint of any JSON-serialisable object."""
    payload = json.dumps(items, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.blake2b(payload, digest_size=12).hexdigest()


def weights_hash(model) -> str:
    """A hash of every parameter and buffer of a ``torch.nn.Module``: two models with equal hashes compute alike.

    Caches key a teacher's outputs by it, so a fine-tuned or re-quantised teacher never reuses another's entries.
    """
    import torch  # here, not at the top: querygen and the data tools use this module without torch

    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# -- manifests and the sharded cache -------------------------------------------------------------------------------


def read_manifest(path: Path, field: str | None = None, fix: str = "delete the folder") -> dict:
    """The JSON object in ``path`` (its ``field`` if given); a damaged file is a ``ValueError`` naming it."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        stored = manifest if field is None else manifest[field]
        if not isinstance(stored, dict):
            raise TypeError(f"expected an object, found {type(stored).__name__}")
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path}: unreadable cache manifest ({error!r}); {fix}") from None
    return stored


def check_settings(where: Path, stored: dict, expected: dict, what: str, fix: str) -> None:
    """Refuse a cache made under other settings, naming every setting that differs: reusing it would silently mix
    another model's (or prompt's) outputs into this run's."""
    if stored != expected:
        differ = sorted(k for k in {**stored, **expected} if stored.get(k) != expected.get(k))
        raise ValueError(f"{where}: {what} ({', '.join(differ)} differ); {fix}")


class ShardedCache:
    """A folder of checksummed shards keyed by text fingerprints, for outputs too costly to compute twice.

    Layout: ``DIR/manifest.json`` (what produced the outputs) and ``DIR/shards/NNNNN{suffix}`` with
    ``NNNNN.json`` (``NNNNN-rR`` when rank R of a torchrun job wrote it). A shard's json lists the keys of its rows
    and the sha256 of its data file, and is written last, atomically: a shard without it is ignored, so a kill
    loses at most the shard being written. A shard whose checksum or shape is wrong is deleted with a warning and
    its rows are computed again. A key found in two shards is served from the first.

    A subclass names its manifest field and wording (``identity_field``, ``what``, ``redo``), its data file
    (``suffix``, :meth:`_serialise`, :meth:`_deserialise`) and what part of a stored identity must match
    (:meth:`_comparable`).
    """

    suffix = ".npy"
    identity_field = "identity"
    what = "cache"  # who produced the outputs, for messages
    redo = "recomputed"

    def __init__(self, folder: Path, manifest: dict, expected: dict):
        self.dir = Path(folder)
        self.dir.joinpath("shards").mkdir(parents=True, exist_ok=True)
        self._logger = logging.getLogger(type(self).__module__)  # warnings come from the subclass's module
        path = self.dir / "manifest.json"
        if path.exists():
            stored = self._comparable(read_manifest(path, self.identity_field))
            what = f"{self.what} identity does not match this cache folder"
            check_settings(path, stored, expected, what, "delete the folder")
        else:
            atomic_write_json(path, manifest)
        self._rows: dict[str, tuple[int, int]] = {}
        self._shards: list = []
        self._loaded: set[str] = set()  # shard names already in memory
        self._load_shards()

    def __len__(self) -> int:
        return len(self._rows)

    def _comparable(self, stored: dict) -> dict:
        return stored

    def _serialise(self, payload) -> bytes:
        raise NotImplementedError

    def _deserialise(self, data: bytes, rows: int):
        """The payload of a shard of ``rows`` keys; a ``ValueError`` when its contents do not fit them."""
        raise NotImplementedError

    def _load_shards(self) -> None:
        """Load every finished shard not yet in memory (after a torchrun barrier: the other ranks' shards too)."""
        for meta_path in sorted(self.dir.joinpath("shards").glob("*.json")):
            if meta_path.stem in self._loaded:
                continue
            data_path = meta_path.with_suffix(self.suffix)
            try:
                meta = json.loads(meta_path.read_text())
                data = data_path.read_bytes()
                if hashlib.sha256(data).hexdigest() != meta["sha256"]:
                    raise ValueError("checksum mismatch")
                payload = self._deserialise(data, len(meta["keys"]))
            except (OSError, ValueError, KeyError, TypeError) as error:
                self._logger.warning(
                    "%s cache shard %s is corrupt (%s): it will be %s", self.what, meta_path, error, self.redo
                )
                meta_path.unlink(missing_ok=True)
                data_path.unlink(missing_ok=True)
                continue
            self._remember(meta_path.stem, meta["keys"], payload, replace=False)

    def _remember(self, name: str, keys: list[str], payload, replace: bool) -> None:
        index = len(self._shards)
        self._shards.append(payload)
        self._loaded.add(name)
        for row, key in enumerate(keys):
            if replace:
                self._rows[key] = (index, row)
            else:
                self._rows.setdefault(key, (index, row))  # a key in two shards is kept once

    def add_shard(self, keys: list[str], payload) -> None:
        """Write one finished shard (data first, its json last) and serve its rows from now on."""
        from embeddistill.training import distributed  # torch, only once something is written

        shards = self.dir / "shards"
        number = 1 + max((int(p.stem.split("-")[0]) for p in shards.glob("*.json")), default=0)
        # Under torchrun all ranks write into this folder at once: the rank in the name keeps their shards apart.
        name = f"{number:05d}" if distributed.world_size() == 1 else f"{number:05d}-r{distributed.rank()}"
        data = self._serialise(payload)
        atomic_write_bytes(shards / f"{name}{self.suffix}", data)
        # The json is written last: a shard without it is ignored, so a kill between the two loses nothing.
        atomic_write_json(shards / f"{name}.json", {"keys": keys, "sha256": hashlib.sha256(data).hexdigest()})
        # Served as read back from the bytes written (e.g. embeddings stored as float16): a rerun sees the same values.
        self._remember(name, keys, self._deserialise(data, len(keys)), replace=True)
