"""``POST /v1/embeddings``: the service as an OpenAI-compatible embedding endpoint.

An existing client switches to the student by changing its base URL::

    {"input": "a query" | ["...", ...], "model": "anything", "input_type": "query" | "document",
     "encoding_format": "float" | "base64"}
    -> {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [...]}],
        "model": "...", "usage": {"prompt_tokens": N, "total_tokens": N}}

``input_type`` (an extension; OpenAI's own API has one side) picks the encoding side: ``"query"`` (the default:
``encode_query``, the small query tower of an asymmetric student) or ``"document"`` (``encode_document``: the
teacher's tower of an asymmetric student, the model with its document prompt otherwise; an ONNX export has no
document side and answers 422). ``model`` is ignored: the service serves one model, named in the response.
``dimensions`` is accepted only when it equals the model's dimension. The limits are ``/search``'s: body size,
``--max-queries`` texts per request, ``--max-query-chars`` per query (``--max-document-chars`` per document),
no blank text.
"""

# No `from __future__ import annotations` here: FastAPI reads the request model from the live annotation.
import asyncio
import base64
from typing import Annotated, Literal

import numpy as np


def _not_blank(text: str) -> str:
    if not any(char.isprintable() and not char.isspace() for char in text):
        raise ValueError("the input is blank (only whitespace or invisible characters): there is nothing to embed")
    return text


def request_schema(limits):
    from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, model_validator

    longest = max(limits.max_query_chars, limits.max_document_chars)
    Text = Annotated[str, StringConstraints(min_length=1, max_length=longest), AfterValidator(_not_blank)]
    Texts = Annotated[list[Text], Field(min_length=1, max_length=limits.max_queries)]

    class EmbeddingsRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        input: Text | Texts = Field(description="a text or a list of texts (token arrays are not accepted)")
        model: str | None = Field(None, description="ignored: the service serves one model, which it names")
        input_type: Literal["query", "document"] = Field("query", description="the encoding side (an extension)")
        encoding_format: Literal["float", "base64"] = "float"
        dimensions: int | None = Field(None, ge=1, strict=True, description="must equal the model's dimension")
        user: str | None = None

        @model_validator(mode="after")
        def _fits(self):
            """Queries as long as /search takes them (``--max-query-chars``), documents ``--max-document-chars``."""
            limit = limits.max_document_chars if self.input_type == "document" else limits.max_query_chars
            texts = [self.input] if isinstance(self.input, str) else self.input
            too_long = [i for i, text in enumerate(texts) if len(text) > limit]
            if too_long:
                raise ValueError(
                    f"input {too_long[0]} has {len(texts[too_long[0]])} characters: a {self.input_type} may have at "
                    f"most {limit}"
                )
            return self

    return EmbeddingsRequest


def _tokens(searcher, texts: list[str]) -> int:
    """Tokens in ``texts`` by the served model's tokenizer where it has one (``usage``); 0 where it has none."""
    encoder = searcher.encoder
    tokenizer = getattr(encoder, "tokenizer", None) or getattr(getattr(encoder, "model", None), "tokenizer", None)
    if tokenizer is None:
        return 0
    try:
        return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"])
    except Exception:  # noqa: BLE001 - usage is informative only
        return 0


def response(embeddings: np.ndarray, encoding: str, model: str, tokens: int) -> dict:
    """OpenAI's response shape; ``base64`` is each row's little-endian float32 bytes, as OpenAI sends them."""
    rows = (
        [base64.b64encode(row.astype("<f4").tobytes()).decode("ascii") for row in embeddings]
        if encoding == "base64"
        else embeddings.astype(np.float32).tolist()
    )
    data = [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)]
    return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def add_embeddings_route(app, searcher, limits, executor, model_name: str) -> None:
    """Register ``POST /v1/embeddings`` on ``app``; encoding runs in ``executor`` (the service's encoding thread)."""
    from fastapi import HTTPException

    EmbeddingsRequest = request_schema(limits)

    def work(texts: list[str], side: str) -> tuple[np.ndarray, int]:
        embed = searcher.encode_documents if side == "document" else searcher.encode
        return np.asarray(embed(texts), dtype=np.float32), _tokens(searcher, texts)

    @app.post("/v1/embeddings", responses={413: {"description": "request body too large"}})
    async def embeddings(request: EmbeddingsRequest) -> dict:
        texts = [request.input] if isinstance(request.input, str) else list(request.input)
        if request.input_type == "document" and not searcher.has_documents:
            raise HTTPException(422, f"input_type 'document': {model_name} embeds queries only (no document side)")
        vectors, tokens = await asyncio.get_running_loop().run_in_executor(executor, work, texts, request.input_type)
        if request.dimensions is not None and request.dimensions != vectors.shape[1]:
            raise HTTPException(
                422, f"dimensions {request.dimensions}: {model_name} embeds into {vectors.shape[1]} (no truncation)"
            )
        return response(vectors, request.encoding_format, model_name, tokens)
