"""A teacher you can only call: an OpenAI-compatible ``/v1/embeddings`` endpoint, with the teacher cache.

``--teacher http://HOST:PORT/v1`` (``openai:URL`` also works; a URL ending in ``/embeddings`` is used as it is).
Texts go ``--teacher-batch-size`` to a request, ``--teacher-concurrency`` requests at a time; a 429, a 5xx or a
dropped connection is retried ``--teacher-retries`` times with exponential backoff (0.5 s, 1 s, 2 s, ... capped at
30 s), or after the server's ``Retry-After`` where it sends one. ``--teacher-max-requests`` caps the requests sent
(retries included). The API key is read from the environment variable ``--teacher-api-key-env`` names.

Every embedding received goes into the same :class:`~embeddistill.models.teachers.EmbeddingCache` a local teacher
uses, keyed by the URL, the model name and whether ``input_type`` is sent: no text is paid for twice, and a run
stopped by a kill, an error or the budget keeps what it received and resumes from there. The cache's dimension is
learned from the first response (the first text embedded is the probe, and is cached like any other).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, fields
from email.utils import parsedate_to_datetime
from pathlib import Path

import numpy as np

from embeddistill.api_options import api_url
from embeddistill.models.encoding import DOCUMENT, QUERY
from embeddistill.models.teachers import (
    CachedTeacherProperties,
    EmbeddingCache,
    TeacherIdentity,
    cache_shard_size,
    default_cache_dir,
)
from embeddistill.storage import read_manifest, text_key

logger = logging.getLogger(__name__)

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
BACKOFF_BASE, BACKOFF_CAP = 0.5, 30.0
RETRY_AFTER_CAP = 300.0


class TeacherApiError(ValueError):
    """The endpoint could not give the embeddings; the message names the option to change (a ``ValueError``, so
    the command line prints it as one line, as it prints a bad option)."""


class BudgetExhausted(TeacherApiError):
    """``--teacher-max-requests`` was reached; what was received is in the cache."""


@dataclass
class ApiStats:
    """What talking to the teacher cost: ``metrics.json``'s ``teacher_api``."""

    requests: int = 0
    retries: int = 0
    texts_sent: int = 0
    cache_hits: int = 0
    wait_seconds: float = 0.0
    backoff_seconds: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def to_dict(self) -> dict:
        with self.lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "lock"}


@dataclass
class Endpoint:
    """Where and how to call the teacher (the ``api`` section's options)."""

    url: str
    model: str = ""
    api_key_env: str = ""
    batch_size: int = 32
    concurrency: int = 4
    retries: int = 6
    timeout: float = 60.0
    max_requests: int = 0
    input_type: bool = False
    query_prompt: str = ""  # put before every query sent (the cache keys what is sent, prompt included)
    document_prompt: str = ""

    @classmethod
    def of(cls, config) -> Endpoint:
        api, model = config.api, config.model
        return cls(
            endpoint_url(api_url(model.teacher)), api.teacher_api_model, api.teacher_api_key_env,
            model.teacher_batch_size, api.teacher_concurrency, api.teacher_retries, api.teacher_timeout,
            api.teacher_max_requests, api.teacher_api_input_type,
            endpoint_prompt(model.query_prompt), endpoint_prompt(model.document_prompt),
        )  # fmt: skip

    def prompt(self, kind: str) -> str:
        return self.query_prompt if kind == QUERY else self.document_prompt


def endpoint_prompt(option: str) -> str:
    """``--query-prompt`` / ``--document-prompt`` for an endpoint: it has no prompts of its own, so the default
    ('') and 'none' both mean no prompt."""
    return "" if option in ("", "none") else option


def endpoint_url(url: str) -> str:
    """``http://h/v1`` and ``http://h`` -> ``http://h/v1/embeddings``; a URL ending in ``/embeddings`` as it is."""
    url = url.rstrip("/")
    if url.endswith("/embeddings"):
        return url
    return url + ("/embeddings" if url.endswith("/v1") else "/v1/embeddings")


def retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (a number of seconds or an HTTP date), capped; None if absent/bad."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), RETRY_AFTER_CAP)


class EmbeddingsClient:
    """Calls the endpoint: one request per batch, retried with backoff, counted against the budget."""

    def __init__(self, endpoint: Endpoint, stats: ApiStats | None = None):
        self.endpoint = endpoint
        self.stats = stats or ApiStats()
        self.api_key = ""
        if endpoint.api_key_env:
            self.api_key = os.environ.get(endpoint.api_key_env, "")
            if not self.api_key:
                raise TeacherApiError(
                    f"--teacher-api-key-env {endpoint.api_key_env}: that environment variable is not set"
                )

    def _take_budget(self) -> None:
        with self.stats.lock:
            limit = self.endpoint.max_requests
            if limit and self.stats.requests >= limit:
                raise BudgetExhausted(
                    f"--teacher-max-requests {limit} reached: the embeddings received so far are in the teacher "
                    "cache; run again with a larger budget (or 0 for none) to continue from there"
                )
            self.stats.requests += 1

    def _send(self, texts: list[str], kind: str) -> dict:
        body = {"input": texts, "model": self.endpoint.model, "encoding_format": "float"}
        if self.endpoint.input_type:
            body["input_type"] = kind
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(
            self.endpoint.url, data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        with urllib.request.urlopen(request, timeout=self.endpoint.timeout) as response:
            return json.loads(response.read())

    def embed(self, texts: list[str], kind: str) -> np.ndarray:
        """One batch's embeddings (rows in order), retried on 429/5xx and dropped connections."""
        for attempt in range(self.endpoint.retries + 1):
            self._take_budget()
            try:
                payload = self._send(texts, kind)
            except urllib.error.HTTPError as error:
                detail = error.read()[:300].decode("utf-8", "replace")
                if error.code not in RETRY_STATUS and error.code < 500:
                    raise self._refused(error.code, detail) from None
                wait_for, why = retry_after(error.headers.get("Retry-After")), f"HTTP {error.code} {detail}"
            except (urllib.error.URLError, OSError) as error:  # refused, reset, timed out
                wait_for, why = None, f"{getattr(error, 'reason', error)}"
            else:
                with self.stats.lock:
                    self.stats.texts_sent += len(texts)
                return parse_embeddings(payload, len(texts), self.endpoint.url)
            if attempt == self.endpoint.retries:
                break
            delay = wait_for if wait_for is not None else min(BACKOFF_BASE * 2**attempt, BACKOFF_CAP)
            delay *= 1.0 if wait_for is not None else random.uniform(0.8, 1.2)
            logger.warning("teacher %s: %s; retry %d in %.1f s", self.endpoint.url, why, attempt + 1, delay)
            with self.stats.lock:
                self.stats.retries += 1
                self.stats.backoff_seconds += delay
            time.sleep(delay)
        raise TeacherApiError(
            f"--teacher {self.endpoint.url}: no answer after {self.endpoint.retries + 1} attempts (last: {why}); "
            "the embeddings received so far are in the teacher cache (raise --teacher-retries, or check the URL)"
        )

    def _refused(self, status: int, detail: str) -> TeacherApiError:
        url = self.endpoint.url
        if status in (401, 403):
            key = f"--teacher-api-key-env {self.endpoint.api_key_env}" if self.endpoint.api_key_env else "no key"
            return TeacherApiError(
                f"--teacher {url} refused the key (HTTP {status}: {detail}); sent {key}: set --teacher-api-key-env "
                "to the variable holding a valid key"
            )
        if status in (404, 405):
            return TeacherApiError(
                f"--teacher {url}: HTTP {status} ({detail}); is this an OpenAI-compatible endpoint? give its base URL, "
                "e.g. http://host:port/v1"
            )
        return TeacherApiError(
            f"--teacher {url} refused the request (HTTP {status}: {detail}); check --teacher-api-model and "
            "--teacher-batch-size"
        )


def parse_embeddings(payload: dict, count: int, url: str) -> np.ndarray:
    """The rows of an OpenAI ``/v1/embeddings`` response, by ``index``; float lists or base64 float32."""
    try:
        items = sorted(payload["data"], key=lambda item: item["index"])
        rows = [
            np.frombuffer(base64.b64decode(e), dtype="<f4") if isinstance(e, str) else np.asarray(e, np.float32)
            for e in (item["embedding"] for item in items)
        ]
        array = np.stack(rows).astype(np.float32)
    except (KeyError, TypeError, ValueError) as error:
        raise TeacherApiError(f"--teacher {url}: not an embeddings response ({error!r})") from None
    if array.shape[0] != count:
        raise TeacherApiError(f"--teacher {url}: {array.shape[0]} embeddings came back for {count} texts")
    return array


class ApiEmbeddingCache(EmbeddingCache):
    """The teacher cache, filled by an endpoint: a batch that came back is stored even when a later one fails."""

    def embed(
        self, model, texts: list[str], kind: str, batch_size: int = 32, desc: str = "", compile: bool = False
    ) -> np.ndarray:
        hits = len(texts) - len(self.missing(texts, kind))
        with model.stats.lock:
            model.stats.cache_hits += hits
        return super().embed(model, texts, kind, batch_size, desc)

    def _encode(self, model, texts: list[str], kind: str, batch_size: int, desc: str, compile: bool = False) -> None:
        # `compile` is the local teacher's: an endpoint has nothing to compile
        client: EmbeddingsClient = model
        for start in range(0, len(texts), self.shard_size):
            chunk = texts[start : start + self.shard_size]
            batches = [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
            logger.info("teacher %s: %d %s texts in %d requests", client.endpoint.url, len(chunk), kind, len(batches))
            tick = time.perf_counter()
            with ThreadPoolExecutor(max_workers=client.endpoint.concurrency) as pool:
                futures = [pool.submit(client.embed, batch, kind) for batch in batches]
                done, pending = wait(futures, return_when=FIRST_EXCEPTION)
                for future in pending:
                    future.cancel()
                wait(futures)  # requests in flight finish, and their embeddings are kept
            with client.stats.lock:
                client.stats.wait_seconds += time.perf_counter() - tick
            received = [(b, f.result()) for b, f in zip(batches, futures, strict=True) if _succeeded(f)]
            if received:
                keys = [text_key(f"{kind}\0{t}") for batch, _ in received for t in batch]
                self.add_shard(keys, np.concatenate([rows for _, rows in received]))
            failed = next((f for f in futures if not f.cancelled() and f.exception() is not None), None)
            if failed is not None:
                raise failed.exception()


def _succeeded(future) -> bool:
    return not future.cancelled() and future.exception() is None


def api_identity(endpoint: Endpoint, dimension: int = 0, normalized: bool = False) -> TeacherIdentity:
    """The cache identity of an endpoint: its URL, model name and input_type setting stand for the weights."""
    return TeacherIdentity(
        name=re.sub(r"[^A-Za-z0-9.-]+", "_", f"{endpoint.url.split('://', 1)[-1]}-{endpoint.model or 'default'}"),
        weights=f"api:{endpoint.url}#{endpoint.model}",
        pooling=json.dumps({"input_type": endpoint.input_type}),
        normalized=normalized,
        max_seq_length=0,
        dimension=dimension,
        prompts={},
    )


def find_api_cache(root: Path, endpoint: Endpoint, shard_size: int) -> ApiEmbeddingCache | None:
    """The cache an earlier run with this endpoint made under ``root`` (so a rerun needs no probe request)."""
    wanted = api_identity(endpoint)
    for manifest in sorted(Path(root).expanduser().glob("*/manifest.json")):
        try:
            identity = TeacherIdentity(**read_manifest(manifest, EmbeddingCache.identity_field))
        except (ValueError, TypeError):
            continue
        if (identity.weights, identity.pooling) == (wanted.weights, wanted.pooling):
            return ApiEmbeddingCache(root, identity, shard_size=shard_size)
    return None


class ApiTeacher(CachedTeacherProperties):
    """An endpoint as a teacher: ``embed_documents`` / ``embed_queries`` through the cache; no local model."""

    model = None  # nothing to build a student from, nor to time

    def __init__(self, endpoint: Endpoint, cache_dir: str | os.PathLike | None = None):
        self.endpoint = endpoint
        self.name = endpoint.url
        self.stats = ApiStats()
        self.client = EmbeddingsClient(endpoint, self.stats)
        self.root = Path(cache_dir or default_cache_dir()).expanduser()
        self.cache = find_api_cache(self.root, endpoint, cache_shard_size())

    @classmethod
    def of(cls, config) -> ApiTeacher:
        return cls(Endpoint.of(config), config.model.cache_dir or None)

    def _ready(self, texts: list[str], kind: str) -> None:
        """Open the cache on the first call of a fresh endpoint: one text's embedding gives its dimension."""
        if self.cache is not None or not texts:
            return
        tick = time.perf_counter()
        probe = self.client.embed(texts[:1], kind)
        self.stats.wait_seconds += time.perf_counter() - tick
        normalized = bool(abs(float(np.linalg.norm(probe[0])) - 1.0) < 1e-3)
        identity = api_identity(self.endpoint, probe.shape[1], normalized)
        self.cache = ApiEmbeddingCache(self.root, identity, shard_size=cache_shard_size())
        self.cache.add_shard([text_key(f"{kind}\0{texts[0]}")], probe)
        with self.stats.lock:  # the cache is about to count the probe's text as found there: it was sent
            self.stats.cache_hits -= 1
        logger.info("teacher %s: dim %d, cache %s", self.endpoint.url, identity.dimension, self.cache.dir)

    def _embed(self, texts: list[str], kind: str, desc: str) -> np.ndarray:
        if prompt := self.endpoint.prompt(kind):
            texts = [prompt + text for text in texts]
        self._ready(texts, kind)
        return self.cache.embed(self.client, texts, kind, self.endpoint.batch_size, desc)

    def embed_documents(self, texts: list[str], desc: str = "documents") -> np.ndarray:
        return self._embed(texts, DOCUMENT, desc)

    def embed_queries(self, texts: list[str], desc: str = "queries") -> np.ndarray:
        return self._embed(texts, QUERY, desc)
