"""Retrieval datasets by name from the Hugging Face hub, converted once into a local BEIR folder.

``--dataset scifact`` that is no folder (and not under ``$EMBEDDISTILL_DATA``) is looked for on the hub, where the
BEIR / MTEB retrieval sets are published in two layouts, tried in this order:

* ``mteb/NAME``: configs ``corpus`` (``_id``, ``title``, ``text``), ``queries`` (``_id``, ``text``) and ``default``
  (the qrels: ``query-id``, ``corpus-id``, ``score``; one split each for train / dev / test);
* ``BeIR/NAME`` (configs ``corpus`` and ``queries``) with its qrels in ``BeIR/NAME-qrels`` (one split each).

A name with an owner (``--dataset mteb/scifact``) is that repository only. Each is read with the ``datasets`` library
(the ``hub`` extra) and written once as ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/SPLIT.tsv`` under
``$EMBEDDISTILL_CACHE/datasets/NAME`` (default ``~/.cache/embeddistill/datasets/NAME``): staged, then renamed
into place, so an interrupted download leaves no half folder, and later runs read the folder without the hub.

``$EMBEDDISTILL_HUB_DATASETS`` names a local mirror of the hub: repository ``OWNER/NAME`` is then read from that
folder's ``OWNER/NAME/`` (the repository's own files: its README's ``configs`` and the data files they name), and
never from the network. The tests use it; it also serves a machine that keeps a copy of the repositories.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

MIRROR_ENV = "EMBEDDISTILL_HUB_DATASETS"
CACHE_ENV = "EMBEDDISTILL_CACHE"  # the teacher cache's variable: one root for every cache
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


class HubDatasetError(FileNotFoundError):
    """No hub repository gave the dataset (offline, unknown name, no ``datasets``); the message says why."""


def hub_candidates(name: str) -> list[tuple[str, str | None]]:
    """``(repository, qrels repository or None)`` to try for ``name``, in order ([] for what is no hub name)."""
    if name.startswith((".", "~")) or not _NAME.match(name):
        return []
    if "/" in name:
        owner, short = name.split("/")
        return [(name, f"{name}-qrels" if owner.lower() == "beir" else None)]
    return [(f"mteb/{name}", None), (f"BeIR/{name}", f"BeIR/{name}-qrels")]


def datasets_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "embeddistill") / "datasets"


def converted_folder(name: str) -> Path:
    return datasets_cache_dir() / name.replace("/", "__")


def _source(repository: str) -> str:
    """Where ``datasets`` reads ``repository``: the hub id, or its folder in ``$EMBEDDISTILL_HUB_DATASETS``."""
    mirror = os.environ.get(MIRROR_ENV)
    return str(Path(mirror).expanduser() / repository) if mirror else repository


def _load(repository: str, config: str | None):
    import datasets

    source = _source(repository)
    if os.environ.get(MIRROR_ENV) and not Path(source).is_dir():
        raise FileNotFoundError(f"{source} does not exist (${MIRROR_ENV} is set: repositories are read from there)")
    return datasets.load_dataset(source, config) if config else datasets.load_dataset(source)


def _rows(dataset_dict) -> list[dict]:
    return [row for split in dataset_dict.values() for row in split]


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _write_folder(folder: Path, corpus: list[dict], queries: list[dict], qrels: dict[str, list[dict]]) -> None:
    """Write the BEIR files into a staging folder beside ``folder``, then rename it into place."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        documents = [{"_id": str(r["_id"]), "title": r.get("title") or "", "text": r.get("text") or ""} for r in corpus]
        (staging / "corpus.jsonl").write_text(_jsonl(documents), encoding="utf-8")
        questions = [{"_id": str(r["_id"]), "text": r.get("text") or ""} for r in queries]
        (staging / "queries.jsonl").write_text(_jsonl(questions), encoding="utf-8")
        (staging / "qrels").mkdir()
        for split, rows in qrels.items():
            lines = ["query-id\tcorpus-id\tscore"] + [
                f"{r['query-id']}\t{r['corpus-id']}\t{int(float(r['score']))}" for r in rows
            ]
            (staging / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.chmod(staging, 0o777 & ~_umask())
        if folder.exists():  # another process converted it meanwhile: keep theirs
            shutil.rmtree(staging)
        else:
            staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _convert(name: str, repository: str, qrels_repository: str | None) -> Path:
    corpus = _rows(_load(repository, "corpus"))
    queries = _rows(_load(repository, "queries"))
    qrels_source = _load(qrels_repository, None) if qrels_repository else _load(repository, "default")
    qrels = {split: list(rows) for split, rows in qrels_source.items()}
    folder = converted_folder(name)
    _write_folder(folder, corpus, queries, qrels)
    logger.info("dataset %s: %s converted into %s (%d documents)", name, repository, folder, len(corpus))
    return folder


def fetch_dataset(name: str) -> Path:
    """The local BEIR folder of hub dataset ``name``: converted before, or now from the first repository that loads.

    Raises :class:`HubDatasetError` naming every repository tried and why it failed.
    """
    folder = converted_folder(name)
    if (folder / "corpus.jsonl").is_file():
        return folder
    candidates = hub_candidates(name)
    if not candidates:
        raise HubDatasetError(f"{name!r} is no hub dataset name")
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise HubDatasetError(
            "reading datasets from the Hugging Face hub needs: pip install 'embeddistill[hub]'"
        ) from None
    failures = []
    for repository, qrels_repository in candidates:
        try:
            return _convert(name, repository, qrels_repository)
        except Exception as error:  # offline, no such repository, another layout: try the next one
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            failures.append(f"{repository}: {type(error).__name__}: {first[:200]}")
    raise HubDatasetError("not on the Hugging Face hub either (tried):\n    " + "\n    ".join(failures))
