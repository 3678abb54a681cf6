"""Language-model query generation: a small LM writes a search query for each document.

Cheap crops are query-length but not query-shaped; an LM writes text that reads like a real search query
(a question or keyword phrase a user would type), which puts distillation queries nearer the real query
distribution (docs/METHOD.md, section 2 "Query generation"). Two kinds of model are supported:

* any causal LM (a Hugging Face name or folder, or a local ``.gguf`` file such as Gemma-3-270M Q4_K_M),
  driven by a fixed few-shot prompt ``Document: ... / Query: ...`` ending in ``Query:``;
* a seq2seq doc2query model (e.g. doc2query T5, whose config says ``is_encoder_decoder``), fed the
  document itself, since it was trained on exactly that.

Generation is slow (tens of queries a second at best on a CPU), so every finished batch is appended to a
jsonl cache and a rerun resumes where the last one stopped. Raw outputs still hold junk - empty lines,
repeats, echoes of the prompt - that :func:`filter_generated` removes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from embeddistill.extras import require
from embeddistill.querygen.base import GeneratedQuery
from embeddistill.storage import atomic_write_json, check_settings, fingerprint, read_manifest

logger = logging.getLogger(__name__)

_WORD = re.compile(r"\S+")
_TOKEN = re.compile(r"\w+")

# Generic examples from unrelated fields, so that the prompt teaches the format (a short query a user would
# type, not a copied sentence) without pulling the outputs toward any one corpus's topics.
FEW_SHOT_EXAMPLES: tuple[tuple[str, str], ...] = (
    (
        "The Great Barrier Reef is the world's largest coral reef system, stretching over 2,300 kilometres off "
        "the coast of Queensland, Australia. Rising sea temperatures have caused repeated mass bleaching events "
        "since 1998, killing large areas of coral.",
        "what causes coral bleaching on the great barrier reef",
    ),
    (
        "Python's list.sort method sorts a list in place and is guaranteed to be stable: items that compare "
        "equal keep their original order. It accepts a key function and a reverse flag.",
        "is python list sort stable",
    ),
    (
        "Vitamin D is made in the skin when it is exposed to ultraviolet B light. At high latitudes there is "
        "too little UVB in winter, so deficiency is common and can weaken bones.",
        "why is vitamin d deficiency common in winter",
    ),
)
PROMPT_INSTRUCTION = "Write a short search query that each document answers.\n\n"


def build_prompt(document: str) -> str:
    """The few-shot prompt for a causal LM; the model continues it after ``Query:``."""
    shots = "".join(f"Document: {text}\nQuery: {query}\n\n" for text, query in FEW_SHOT_EXAMPLES)
    return f"{PROMPT_INSTRUCTION}{shots}Document: {document}\nQuery:"


def truncate_words(text: str, max_words: int) -> str:
    words = _WORD.findall(text)
    return " ".join(words[:max_words]) if max_words > 0 else " ".join(words)


def first_line(text: str) -> str:
    """The query is the first line of the continuation: the model goes on to invent the next example."""
    return text.split("\n", 1)[0].strip()


def _resolve_model(model: str) -> tuple[str, str | None]:
    """``(name_or_folder, gguf_file)``: a ``.gguf`` file, or a folder whose only model is one, loads as GGUF."""
    path = Path(model).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return str(path.parent), path.name
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(path), ggufs[0]
        if len(ggufs) > 1:
            raise ValueError(f"{path} holds several GGUF files ({', '.join(ggufs)}); pass the file itself")
    return model, None


def _load_gguf_without_accelerate(model_class: Any, folder: str, gguf_file: str, config: Any, dtype: Any) -> Any:
    """Load a GGUF checkpoint the way transformers' own loader does, minus its hard ``accelerate`` check.

    ``from_pretrained(..., gguf_file=...)`` refuses to run without ``accelerate`` although, for a CPU load
    without a device map, nothing in that path uses it. This builds the model from the GGUF's config and
    fills it with transformers' dequantized tensors, giving the same weights (checked on Gemma-3-270M).
    """
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    require("lm", "gguf", purpose=f"reading the GGUF file {gguf_file}")
    model = model_class.from_config(config, dtype=dtype)
    parsed = load_gguf_checkpoint(
        str(Path(folder) / gguf_file), return_tensors=True, model_to_load=model, torch_dtype=dtype
    )
    missing, unexpected = model.load_state_dict(parsed["tensors"], strict=False)
    model.tie_weights()  # e.g. Gemma's output layer is its input embedding, which GGUF stores once
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {params[name].data_ptr() for name in parsed["tensors"] if name in params}
    untied = [name for name in missing if name in params and params[name].data_ptr() not in loaded]
    if untied or unexpected:
        raise RuntimeError(
            f"{gguf_file}: the GGUF weights do not fit the model (missing {untied[:5]}, unexpected "
            f"{unexpected[:5]}); install `accelerate` so that transformers' own GGUF loader is used"
        )
    return model


@dataclass
class _Cache:
    """Append-only jsonl of :meth:`GeneratedQuery.to_json` rows, written one finished batch at a time.

    A ``kill -9`` can leave the last line half-written; it is dropped (with a warning) and cut off the file
    before anything is appended, so it can never merge with the next row. A sidecar ``.config.json`` holds
    the settings that shaped the rows, so a cache is not silently reused with another model or prompt; it is
    checked like a :class:`~embeddistill.storage.ShardedCache` manifest. Generated text arrives one row at a time
    and must survive a kill between rows, which is why this cache is an append-only file, not shards of arrays.
    """

    path: Path
    settings: dict

    @property
    def config_path(self) -> Path:
        return self.path.with_name(self.path.name + ".config.json")

    def load(self) -> dict[str, GeneratedQuery]:
        if self.config_path.exists():
            fix = f"delete {self.path.name} (and {self.config_path.name}) or choose another cache_path"
            stored = read_manifest(self.config_path, fix=fix)
            check_settings(self.path, stored, self.settings, "was generated with other settings", fix)
        if not self.path.exists():
            return {}
        raw = self.path.read_bytes()
        *lines, tail = raw.split(b"\n")
        rows: dict[str, GeneratedQuery] = {}
        for number, line in enumerate(lines, start=1):
            if line.strip():
                query = self._parse(line)
                if query is None:
                    raise ValueError(f"{self.path}:{number}: malformed cache row {line[:80]!r}; delete that line")
                rows.setdefault(query.query_id, query)
        if tail.strip():
            query = self._parse(tail)
            with open(self.path, "r+b") as handle:
                if query is None:  # half-written by an interrupted run: cut it off
                    logger.warning(
                        "%s: ignoring a truncated last line (%d bytes) left by an interrupted run; its batch is "
                        "generated again",
                        self.path,
                        len(tail),
                    )
                    handle.truncate(len(raw) - len(tail))
                else:  # complete, only its line end is missing
                    rows.setdefault(query.query_id, query)
                    handle.seek(0, os.SEEK_END)
                    handle.write(b"\n")
                handle.flush()
                os.fsync(handle.fileno())
        return rows

    @staticmethod
    def _parse(line: bytes) -> GeneratedQuery | None:
        try:
            row = json.loads(line.decode("utf-8"))
            return GeneratedQuery(str(row["_id"]), str(row["text"]), str(row["source_id"]), str(row["generator"]))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            return None

    def append(self, queries: list[GeneratedQuery]) -> None:
        if not self.config_path.exists():
            atomic_write_json(self.config_path, self.settings)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = "".join(json.dumps(q.to_json(), ensure_ascii=False) + "\n" for q in queries)
        with open(self.path, "ab") as handle:
            handle.write(payload.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())


@dataclass
class _Loaded:
    model: Any
    tokenizer: Any
    encoder_decoder: bool
    stop_ids: list[int]  # end-of-sequence ids for causal generation: the model's own plus every newline token


def _stop_ids(tokenizer: Any, eos: int | list[int] | None) -> list[int]:
    """The model's end-of-sequence ids plus every token whose text holds a line break.

    The query is the first line of the continuation, so a row can stop at its first newline instead of
    running on to ``max_new_tokens`` (the model would write the next ``Document:``). Making newline tokens
    extra end-of-sequence ids does that inside ``generate`` for any tokenizer; transformers' ``stop_strings``
    fails on some (e.g. word-level) vocabularies. Decoding the whole vocabulary once takes about 2 s for
    Gemma's 262k tokens.
    """
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    newline = [i for i, text in enumerate(texts) if "\n" in text]
    own = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if tokenizer.eos_token_id is not None:
        own.append(tokenizer.eos_token_id)
    return sorted(set(own) | set(newline))


@dataclass
class LMQueryGenerator:
    """``per_document`` LM-written queries for every document, batched, seeded and resumable.

    ``model`` is a Hugging Face causal or seq2seq LM (name or folder), or a ``.gguf`` file (or a folder
    holding one). Documents are cut to ``max_document_words`` words in the prompt: the opening of a
    document usually says what it is about, and prompt length dominates the cost. Each copy of a document
    is its own row of a batch, so with ``do_sample=False`` the copies are identical (the filter drops them).

    Batches are planned over all (document, copy) items (longest documents first, to waste little padding)
    and batch ``b`` samples under ``torch.manual_seed`` derived from ``seed`` and ``b``, so a run that was
    interrupted and resumed from ``cache_path`` gives the same queries as one that was not (on the same
    hardware and ``batch_size``). Query ids are ``lm-{doc_id}-{copy}``.
    """

    model: str
    per_document: int = 1
    max_new_tokens: int = 32
    temperature: float = 0.7
    top_p: float = 0.9
    do_sample: bool = True
    batch_size: int = 8
    max_document_words: int = 200
    cache_path: str | os.PathLike | None = None
    trust_remote_code: bool = False
    device: str | None = None  # None: CUDA when available, else CPU
    # Stop starting new batches after this many seconds (0 = no limit): the cache keeps what was made, and a
    # rerun continues from there. Lets a slow machine produce a usable query file in a known time.
    max_seconds: float = 0.0
    # None: float32 on CPU, bfloat16 on CUDA. "bfloat16" on a CPU with AVX512-BF16 or AMX is about twice as fast
    # (measured with Gemma-3-270M), but much slower on one without: hence not the CPU default.
    dtype: str | None = None
    name: str = "lm"
    _loaded: _Loaded | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.per_document < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("per_document, batch_size and max_new_tokens must be at least 1")
        if self.do_sample and self.temperature <= 0:
            raise ValueError("temperature must be positive when sampling")
        if not self.do_sample and self.per_document > 1:
            logger.warning(
                "greedy decoding (do_sample=False) writes %d identical copies per document", self.per_document
            )

    def settings(self, seed: int) -> dict:
        """What determines the generated texts (not ``batch_size`` or ``device``: changing them may resume)."""
        return {
            "model": str(self.model),
            "prompt": fingerprint([PROMPT_INSTRUCTION, FEW_SHOT_EXAMPLES]),
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "do_sample": self.do_sample,
            "max_document_words": self.max_document_words,
            "seed": seed,
        }

    def generate(self, documents: Mapping[str, str], queries: Mapping[str, str], seed: int) -> Iterator[GeneratedQuery]:
        """Yield cached queries for ``documents`` first, then generate the rest batch by batch."""
        texts = {doc_id: truncate_words(text, self.max_document_words) for doc_id, text in documents.items()}
        texts = {doc_id: text for doc_id, text in texts.items() if text}
        items = [(doc_id, copy) for doc_id in texts for copy in range(self.per_document)]
        items.sort(key=lambda item: -len(texts[item[0]]))  # stable: ties keep document order
        batches = [items[i : i + self.batch_size] for i in range(0, len(items), self.batch_size)]

        cache = _Cache(Path(self.cache_path), self.settings(seed)) if self.cache_path is not None else None
        cached = cache.load() if cache is not None else {}
        left = Counter(doc_id for doc_id, copy in items if self._query_id(doc_id, copy) not in cached)
        for doc_id, copy in items:
            query = cached.get(self._query_id(doc_id, copy))
            if query is not None:
                yield query
        if cached:
            logger.info(
                "%s: %d cached queries reused, %d to generate",
                self.cache_path,
                len(items) - sum(left.values()),
                sum(left.values()),
            )
        if not left:
            return

        started = time.monotonic()
        self._load()
        progress = tqdm(total=len(texts), initial=len(texts) - len(left), desc="lm queries", unit="doc", mininterval=2)
        with progress:
            for index, batch in enumerate(batches):
                if all(self._query_id(doc_id, copy) in cached for doc_id, copy in batch):
                    continue
                if self.max_seconds and time.monotonic() - started > self.max_seconds:
                    logger.warning(
                        "time budget of %.0f s reached: %d of %d documents have queries; rerun to continue",
                        self.max_seconds,
                        len(texts) - len(+left),
                        len(texts),
                    )
                    return
                outputs = self._generate_batch([texts[doc_id] for doc_id, _ in batch], seed, index)
                fresh = [
                    GeneratedQuery(self._query_id(doc_id, copy), text, doc_id, self.name)
                    for (doc_id, copy), text in zip(batch, outputs, strict=True)
                    if self._query_id(doc_id, copy) not in cached
                ]
                if cache is not None:
                    cache.append(fresh)
                for query in fresh:
                    left[query.source_id] -= 1
                    if left[query.source_id] == 0:
                        progress.update(1)
                yield from fresh

    @staticmethod
    def _query_id(doc_id: str, copy: int) -> str:
        return f"lm-{doc_id}-{copy}"

    def _generate_batch(self, documents: list[str], seed: int, index: int) -> list[str]:
        import torch

        loaded = self._load()
        model, tokenizer, encoder_decoder = loaded.model, loaded.tokenizer, loaded.encoder_decoder
        inputs = documents if encoder_decoder else [build_prompt(text) for text in documents]
        encoded = tokenizer(inputs, return_tensors="pt", padding=True, truncation=encoder_decoder).to(model.device)
        options: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample}
        if self.do_sample:
            options.update(temperature=self.temperature, top_p=self.top_p)
        if loaded.stop_ids:  # the query ends at the first line break: stop there, not at max_new_tokens
            options["eos_token_id"] = loaded.stop_ids
        torch.manual_seed((seed * 1_000_003 + index) % 2**63)
        with torch.inference_mode():
            output = model.generate(**encoded, pad_token_id=tokenizer.pad_token_id, **options)
        if not encoder_decoder:
            output = output[:, encoded["input_ids"].shape[1] :]  # keep only the continuation (left padding)
        return [first_line(text) for text in tokenizer.batch_decode(output, skip_special_tokens=True)]

    def _load(self) -> _Loaded:
        """Load the model and tokenizer, once."""
        if self._loaded is not None:
            return self._loaded
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
        from transformers.utils import is_accelerate_available

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = (
            getattr(torch, self.dtype) if self.dtype else torch.bfloat16 if device.startswith("cuda") else torch.float32
        )
        source, gguf_file = _resolve_model(self.model)
        extra = {"gguf_file": gguf_file} if gguf_file else {}
        remote = {"trust_remote_code": self.trust_remote_code}
        logger.info("loading query generator %s%s", self.model, " (GGUF, dequantized on load)" if gguf_file else "")
        config = AutoConfig.from_pretrained(source, **extra, **remote)
        encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        model_class = AutoModelForSeq2SeqLM if encoder_decoder else AutoModelForCausalLM
        tokenizer = AutoTokenizer.from_pretrained(source, **extra, **remote)
        tokenizer.padding_side = "right" if encoder_decoder else "left"  # a decoder continues the last token
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if gguf_file and not is_accelerate_available():
            logger.info("accelerate is not installed: loading %s through the GGUF tensors directly", gguf_file)
            model = _load_gguf_without_accelerate(model_class, source, gguf_file, config, dtype)
        else:
            model = model_class.from_pretrained(source, config=config, dtype=dtype, **extra, **remote)
        model.to(device).eval()
        stop_ids = [] if encoder_decoder else _stop_ids(tokenizer, model.generation_config.eos_token_id)
        self._loaded = _Loaded(model, tokenizer, encoder_decoder, stop_ids)
        return self._loaded


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def _longest_common_run(query: list[str], document: list[str]) -> int:
    """Length of the longest run of consecutive query words that also occurs consecutively in the document."""
    best, previous = 0, [0] * (len(document) + 1)
    for word in query:
        current = [0] * (len(document) + 1)
        for j, other in enumerate(document, start=1):
            if word == other:
                current[j] = previous[j - 1] + 1
                best = max(best, current[j])
        previous = current
    return best


def filter_generated(
    queries: Iterable[GeneratedQuery],
    documents: Mapping[str, str],
    exclude: Iterable[str] = (),
    copy_fraction: float = 0.8,
    min_copy_words: int = 4,
) -> list[GeneratedQuery]:
    """Drop generated queries that would teach the student nothing or the wrong thing; keep the first of each.

    Dropped, in this order (counts are logged):

    * empty - nothing but whitespace;
    * prompt echo - starts with ``Document:`` or ``Query:``, or equals a few-shot example's query or text
      (case and spacing ignored): the model repeated its prompt instead of writing a query;
    * document copy - a query of at least ``min_copy_words`` words of which more than ``copy_fraction`` is
      one contiguous span of its source document (compared as lower-cased ``\\w+`` tokens). Crops already
      give such spans; shorter queries are kept, since a 2-3 word key phrase from the text is a fine query;
    * duplicate - same text (case and spacing ignored) as a kept query or as one of ``exclude`` (e.g. the
      evaluation queries, which must not leak into training).
    """
    examples = {_normalise(text) for pair in FEW_SHOT_EXAMPLES for text in pair}
    seen = {_normalise(text) for text in exclude}
    dropped: Counter = Counter()
    kept: list[GeneratedQuery] = []
    for query in queries:
        text = query.text.strip()
        key = _normalise(text)
        if not key:
            dropped["empty"] += 1
        elif key.startswith(("document:", "query:")) or key in examples:
            dropped["prompt echo"] += 1
        elif _is_document_copy(text, documents.get(query.source_id, ""), copy_fraction, min_copy_words):
            dropped["document copy"] += 1
        elif key in seen:
            dropped["duplicate"] += 1
        else:
            seen.add(key)
            kept.append(
                query if text == query.text else GeneratedQuery(query.query_id, text, query.source_id, query.generator)
            )
    if dropped:
        logger.info(
            "generated queries: kept %d, dropped %s", len(kept), ", ".join(f"{n} {why}" for why, n in dropped.items())
        )
    return kept


def _is_document_copy(text: str, document: str, copy_fraction: float, min_copy_words: int) -> bool:
    words = _TOKEN.findall(text.lower())
    if len(words) < min_copy_words or not document:
        return False
    return _longest_common_run(words, _TOKEN.findall(document.lower())) > copy_fraction * len(words)
