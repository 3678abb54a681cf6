"""A search service: FastAPI + uvicorn over a :class:`~embeddistill.serving.search.Searcher`.

* ``POST /search`` ``{"queries": ["..."], "k": 10}`` -> ``{"results": [{"query", "hits": [{"id", "score"}]}]}``
* ``POST /v1/embeddings``: OpenAI-compatible embeddings, query side by default, ``"input_type": "document"`` for
  the document side (:mod:`embeddistill.serving.openai_embeddings`); a service started without an index (``serve
  --model M``) answers only this and ``/health``, which is how any sentence-transformers model becomes an endpoint.
* ``GET /health`` -> status, index size and type, model; ``GET /openapi.json`` -> the OpenAPI spec.

Concurrent requests are **micro-batched**: each request's queries go into an asyncio queue; one batcher task
takes what arrives within ``batch_wait_ms`` (up to ``max_batch`` queries) and encodes + searches it in a worker
thread, so the event loop stays free and the encoder runs on batches instead of single queries.

Limits: the body size (``max_request_bytes`` -> 413, checked on the bytes actually received, not only on
Content-Length), the number of queries, ``k`` and the query length (-> 422, from the request schema, which the
OpenAPI spec documents). A query of whitespace only is refused like an empty one, and ``k`` must be a JSON
integer (not ``true`` or ``"10"``). A 422 names what is wrong and echoes at most ``ECHO_CHARS`` characters of the
offending input, with its full length. The default bind address is loopback.
"""

import asyncio
import collections
import contextlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Annotated

import numpy as np

from embeddistill.extras import require
from embeddistill.serving.search import Searcher

logger = logging.getLogger(__name__)

ECHO_CHARS = 200  # what a 422 repeats of a rejected value; the rest is summarised by its length


@dataclass
class ServiceLimits:
    max_batch: int = 64  # queries encoded together by the micro-batcher
    batch_wait_ms: float = 2.0  # how long the batcher waits for more requests once one arrived
    max_request_bytes: int = 1_000_000
    max_queries: int = 256  # per request
    max_k: int = 1000
    max_query_chars: int = 2048
    max_document_chars: int = 100_000  # /v1/embeddings with input_type 'document' (documents are long)

    def __post_init__(self):
        for name, value in asdict(self).items():
            if value < 0 or (value == 0 and name != "batch_wait_ms"):
                raise ValueError(f"service limit {name} must be positive, got {value}")


def parse_size(text: str | int) -> int:
    """``"1MB"``, ``"512KB"``, ``"1MiB"``, ``"2000"`` -> bytes."""
    if isinstance(text, int):
        return text
    value = text.strip().upper().replace(" ", "")
    units = {
        "KIB": 1024,
        "MIB": 1024**2,
        "GIB": 1024**3,
        "KB": 1000,
        "MB": 1000**2,
        "GB": 1000**3,
        "K": 1000,
        "M": 1000**2,
        "G": 1000**3,
        "B": 1,
    }
    unit = next((u for u in units if value.endswith(u)), "")
    number, factor = value[: len(value) - len(unit)], units.get(unit, 1)
    try:
        size = int(float(number) * factor)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (e.g. 1MB, 512KB, 100000)") from None
    if size <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return size


class BodySizeLimit:
    """ASGI middleware: answer 413 to any request body over ``max_bytes``.

    Content-Length is checked first; the body is then read (at most ``max_bytes`` + one chunk) and replayed
    to the app, so a chunked or lying client cannot get more than the limit past it either.
    """

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def _reject(self, send, received: str) -> None:
        body = json.dumps(
            {"detail": f"request body too large: {received}; the limit is {self.max_bytes} bytes"}
        ).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(send, f"{int(declared)} bytes")
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._reject(send, f"more than {self.max_bytes} bytes")
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


class MicroBatcher:
    """Gathers concurrent requests into batches and runs ``work(texts, k)`` on them in one worker thread."""

    def __init__(self, work, max_batch: int, wait_seconds: float):
        self.work = work
        self.max_batch = max_batch
        self.wait_seconds = wait_seconds
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode")
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self._pending: collections.deque = collections.deque()
        self.batches = 0
        self.batched_queries = 0

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, texts: list[str], k: int):
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((texts, k, future))
        return await future

    async def _next(self, wait: float | None):
        """The next request: a carried-over one first, else from the queue (``wait``: None = block)."""
        if self._pending:
            return self._pending.popleft()
        if wait is None:
            return await self.queue.get()
        try:
            return self.queue.get_nowait()
        except asyncio.QueueEmpty:
            if wait <= 0:
                return None
        try:
            return await asyncio.wait_for(self.queue.get(), wait)
        except asyncio.TimeoutError:
            return None

    async def _gather(self) -> list:
        batch = [await self._next(None)]
        size = len(batch[0][0])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_seconds
        while size < self.max_batch:
            item = await self._next(deadline - loop.time())
            if item is None:
                break
            if size + len(item[0]) > self.max_batch:
                self._pending.appendleft(item)  # starts the next batch
                break
            batch.append(item)
            size += len(item[0])
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            live = [item for item in batch if not item[2].done()]  # skip requests whose client went away
            if not live:
                continue
            texts = [text for item in live for text in item[0]]
            k = max(item[1] for item in live)
            try:
                hits = await loop.run_in_executor(self.executor, self.work, texts, k)
            except Exception as error:  # noqa: BLE001 - every waiting request gets the error
                for item in live:
                    if not item[2].done():
                        item[2].set_exception(error)
                continue
            self.batches += 1
            self.batched_queries += len(texts)
            start = 0
            for item_texts, item_k, future in live:
                if not future.done():
                    future.set_result([h[:item_k] for h in hits[start : start + len(item_texts)]])
                start += len(item_texts)


def _searchable(query: str) -> str:
    """A query with something to search for (an empty one is the schema's ``min_length``)."""
    if not any(char.isprintable() and not char.isspace() for char in query):
        raise ValueError("the query is blank (only whitespace or invisible characters): there is nothing to search for")
    return query


def clipped(value):
    """What a 422 echoes of a rejected value: short ones as they are, long ones cut, with their full length.

    Text that is not valid Unicode (a lone surrogate, ``"\\ud800"``, which JSON allows) is echoed escaped: as it
    is, the response itself could not be encoded and the client got a 500 instead of the 422.
    """
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    safe = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(safe) <= ECHO_CHARS:
        return value if safe == text else safe
    return f"{safe[:ECHO_CHARS]}... (cut: {len(text)} characters in all)"


async def _validation_error(request, error):
    """422 with every problem the schema found, each with at most ``ECHO_CHARS`` characters of its input."""
    from fastapi.encoders import jsonable_encoder
    from fastapi.responses import JSONResponse

    details = []
    for problem in error.errors():
        problem = dict(problem)
        if "input" in problem:
            problem["input"] = clipped(problem["input"])
        if "ctx" in problem:  # a validator's exception is in ctx; its message is already in msg
            problem["ctx"] = {k: v for k, v in problem["ctx"].items() if not isinstance(v, Exception)} or None
            if problem["ctx"] is None:
                del problem["ctx"]
        details.append(problem)
    return JSONResponse(status_code=422, content={"detail": jsonable_encoder(details)})


def _schemas(limits: ServiceLimits) -> tuple[type, type]:
    """The request and response models; built per app because the limits are part of the request schema."""
    from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

    Query = Annotated[
        str, StringConstraints(min_length=1, max_length=limits.max_query_chars), AfterValidator(_searchable)
    ]

    class SearchRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        queries: list[Query] = Field(
            min_length=1, max_length=limits.max_queries, description="query texts, searched independently"
        )
        k: int = Field(10, ge=1, le=limits.max_k, strict=True, description="documents per query")

    class SearchHit(BaseModel):
        id: str
        score: float

    class QueryResult(BaseModel):
        query: str
        hits: list[SearchHit]

    class SearchResponse(BaseModel):
        results: list[QueryResult]
        k: int
        took_ms: float

    return SearchRequest, SearchResponse


def _health(searcher: Searcher, batcher: MicroBatcher, limits: ServiceLimits) -> dict:
    """``GET /health``: what is being served and how much the micro-batcher has gathered so far. Models are named
    as a model card names them (a local folder by its name only): any client may ask, and where the files lie on
    the server is none of its business."""
    from embeddistill.evaluation.model_card import public_name

    info, index = searcher.info, searcher.index
    return {
        "status": "ok",
        "documents": len(index) if index is not None else 0,
        "index_type": info.get("type"),
        "dimension": index.dimension if index is not None else None,
        "index_model": public_name(info.get("model")),
        "query_model": public_name(searcher.model_name),
        "batches": batcher.batches,
        "batched_queries": batcher.batched_queries,
        "limits": asdict(limits),
    }


def _results(queries: list[str], hits: list) -> list[dict]:
    """``POST /search``'s ``results``: one entry per query, in request order."""
    return [
        {"query": q, "hits": [{"id": h.id, "score": h.score} for h in query_hits]}
        for q, query_hits in zip(queries, hits, strict=True)
    ]


def create_app(searcher: Searcher, limits: ServiceLimits | None = None):
    """The FastAPI application (wrapped in the body-size limit) serving ``searcher``."""
    require("serve", "fastapi", "pydantic", purpose="the HTTP service")
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError

    from embeddistill.evaluation.model_card import public_name
    from embeddistill.serving.openai_embeddings import add_embeddings_route

    limits = limits or ServiceLimits()
    SearchRequest, SearchResponse = _schemas(limits)

    def work(texts: list[str], k: int) -> list:
        return searcher.search_embeddings(searcher.encode(texts), k)

    batcher = MicroBatcher(work, limits.max_batch, limits.batch_wait_ms / 1000)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(
        title="embeddistill search",
        description="Search a document index with a distilled query encoder (EmbedDistill).",
        version="1",
        lifespan=lifespan,
    )
    app.state.searcher, app.state.batcher, app.state.limits = searcher, batcher, limits
    app.add_exception_handler(RequestValidationError, _validation_error)

    @app.get("/health")
    async def health() -> dict:
        return _health(searcher, batcher, limits)

    if searcher.index is not None:  # without an index the service embeds only

        @app.post("/search", response_model=SearchResponse, responses={413: {"description": "request body too large"}})
        async def search(request: SearchRequest) -> dict:
            started = time.perf_counter()
            hits = await batcher.submit(request.queries, request.k)
            took_ms = (time.perf_counter() - started) * 1000
            return {"results": _results(request.queries, hits), "k": request.k, "took_ms": took_ms}

    add_embeddings_route(app, searcher, limits, batcher.executor, public_name(searcher.model_name))
    return BodySizeLimit(app, limits.max_request_bytes)


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def serve(searcher: Searcher, host: str = "127.0.0.1", port: int = 8000, limits: ServiceLimits | None = None) -> None:
    """Run the service with uvicorn until interrupted."""
    require("serve", "uvicorn", purpose="embeddistill serve")
    import uvicorn

    if not is_loopback(host):
        logger.warning("serving on %s: the service has no authentication; anyone who can reach it can query", host)
    uvicorn.run(create_app(searcher, limits), host=host, port=port, log_level="info", access_log=False)


def warm_up(searcher: Searcher) -> None:
    """One search before serving, so the first request does not pay for lazy initialisation."""
    embeddings = np.asarray(searcher.encode(["warm up"]))
    if searcher.index is not None:
        searcher.search_embeddings(embeddings, 1)
