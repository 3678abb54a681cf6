"""Students: small encoders trained to reproduce a teacher's retrieval geometry.

* **Asymmetric** (docs/METHOD.md, 3): a small trainable query tower and the teacher's own document tower, frozen.
  Saved as a standard sentence-transformers model whose ``Router`` sends ``encode_query`` through the small
  tower (+ projection) and ``encode_document`` through the teacher, so the student searches the teacher's
  index and only the cheap query side runs online. A plain ``encode`` (what BEIR wrappers and most user code
  call) takes the query route too: the Router's ``default_route`` is ``"query"``. The student keeps the prompt
  the teacher's ``encode_document`` uses, so its documents are the teacher's.
* **Symmetric**: one small tower for both sides, both trained; document embedding matching applies.

Prompts. The student's query prompt (``query_prompt``, saved in its ``config_sentence_transformers.json``) is the
string put before every query it is trained on, and so before every query it embeds afterwards: training, the
label-free checks, evaluation and latency go through :class:`QueryEncoder`, which reads it from the student, and
``SentenceTransformer.encode_query`` (and an asymmetric student's plain ``encode``, its query route),
``embeddistill search``, the ONNX export and the service apply the same saved prompt. By default
(``student_query_prompt: auto``) a ``teacher:N`` tower keeps the teacher's query prompt (its layers learned to read
it); any other student model reads plain queries.

A query tower is either any sentence-transformers / Hugging Face model, or ``teacher:N``: the teacher's
embeddings and first ``N`` layers, with its tokenizer and pooling (a strong initialisation, arXiv 2306.11550).
``teacher:0,11`` names the layers to keep instead (two or more, counted from 0, in order): that paper's students
that keep a bottom and the top layer retrieve better than those keeping the first ones.
When its dimension differs from the teacher's, a learned linear projection maps it into the teacher's space.
"""

from __future__ import annotations

import copy
import logging
import re

import numpy as np
import torch
from sentence_transformers import SentenceTransformer
from torch import nn

try:  # sentence-transformers >= 6 moved the modules; 5.x keeps them in `models`
    from sentence_transformers.base.modules import Dense, Normalize, Router, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling
except ImportError:  # pragma: no cover - depends on the installed version
    from sentence_transformers.models import Dense, Normalize, Pooling, Router, Transformer

from embeddistill.models.encoding import embedding_dimension
from embeddistill.models.teachers import (
    NO_PROMPT,
    document_prompt,
    is_normalized,
    load_sentence_transformer,
    query_prompt,
)

logger = logging.getLogger(__name__)

_TEACHER_PREFIX = re.compile(r"^teacher:(-?\d+(?:,-?\d+)+|\d+)$")
QUERY_ROUTE, DOCUMENT_ROUTE = "query", "document"


def _transformer_layers(model: nn.Module) -> tuple[nn.Module, str]:
    """The ``nn.ModuleList`` of transformer blocks of a Hugging Face encoder and the attribute holding it."""
    n_layers = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and name:
            parent_name, _, attribute = name.rpartition(".")
            return model.get_submodule(parent_name) if parent_name else model, attribute
    raise ValueError(f"cannot find the {n_layers} transformer layers of {type(model).__name__}")


def truncate_transformer(transformer: Transformer, n_layers: int, owner: str = "the teacher") -> Transformer:
    """A copy of a sentence-transformers ``Transformer`` module keeping its embeddings and first layers."""
    total = transformer.auto_model.config.num_hidden_layers
    if not 1 <= n_layers <= total:
        raise ValueError(f"asked for the first {n_layers} layers; {owner} has {total}")
    return select_layers(transformer, list(range(n_layers)), owner)


def select_layers(transformer: Transformer, indices: list[int], owner: str = "the teacher") -> Transformer:
    """A copy of a sentence-transformers ``Transformer`` module keeping its embeddings and the layers ``indices``
    (counted from 0, increasing). The copy is a standard model of ``len(indices)`` layers."""
    truncated = copy.deepcopy(transformer)
    hf_model = truncated.auto_model
    total = hf_model.config.num_hidden_layers
    if not indices or indices != sorted(set(indices)) or indices[0] < 0 or indices[-1] >= total:
        raise ValueError(f"asked for layers {indices}; {owner} has layers 0 to {total - 1} (give them increasing)")
    parent, attribute = _transformer_layers(hf_model)
    layers = getattr(parent, attribute)
    setattr(parent, attribute, nn.ModuleList([layers[i] for i in indices]))
    hf_model.config.num_hidden_layers = len(indices)
    return truncated


def layer_indices(numbers: list[int], total: int) -> list[int]:
    """The layers of a ``total``-layer encoder that a layer spec keeps: one number N is the first N layers
    ([2] -> [0, 1]); several name the layers, a negative one counting from the top as in Python ([0, -1] ->
    [0, total - 1])."""
    if len(numbers) == 1:
        return list(range(numbers[0]))
    return [n + total if n < 0 else n for n in numbers]


def teacher_layer_indices(spec: str, total: int) -> list[int] | None:
    """The layers of a ``total``-layer teacher that a ``teacher:...`` student keeps (``teacher:2`` -> [0, 1];
    ``teacher:0,11`` -> [0, 11]; ``teacher:0,-1`` -> [0, total - 1]); None for any other student."""
    match = _TEACHER_PREFIX.match(spec)
    if not match:
        return None
    return layer_indices([int(n) for n in match.group(1).split(",")], total)


def _modules_of(model: SentenceTransformer) -> list[nn.Module]:
    return list(model._modules.values())


def query_tower_modules(
    spec: str, teacher: SentenceTransformer, device: str, trust_remote_code: bool, layers: int | list[int] = 0
) -> list[nn.Module]:
    """Transformer + pooling modules of the student's encoder (no projection or normalisation yet).

    ``layers`` keeps only some transformer layers of a named student model, as ``teacher:...`` does for the
    teacher's: N (or [N]) the first N, [0, -1] the bottom and top ones; 0 or [] keeps them all.
    """
    layers = [layers] if isinstance(layers, int) and layers else list(layers or [])
    if len(layers) == 1 and layers[0] < 1:
        raise ValueError(f"student_layers must be a positive layer count or the layers to keep, got {layers[0]}")
    teacher_modules = _modules_of(teacher)
    match = _TEACHER_PREFIX.match(spec)
    if match:
        if layers:  # two layer specs for one tower would be ambiguous; teacher:... already says it
            raise ValueError(f"student_layers={layers} with student {spec!r}: give the layers in 'teacher:...' only")
        transformer = next(m for m in teacher_modules if isinstance(m, Transformer))
        pooling = next(m for m in teacher_modules if isinstance(m, Pooling))
        indices = teacher_layer_indices(spec, transformer.auto_model.config.num_hidden_layers)
        return [select_layers(transformer, indices), copy.deepcopy(pooling)]
    student = load_sentence_transformer(spec, device=device, trust_remote_code=trust_remote_code)
    # Drop the student's own normalisation and projections: projection and normalisation into the
    # teacher's space are added after it.
    modules = [m for m in _modules_of(student) if not isinstance(m, Normalize | Dense)]
    if layers:
        modules = [_keep_layers(m, layers, spec) if isinstance(m, Transformer) else m for m in modules]
    return modules


def _keep_layers(transformer: Transformer, layers: list[int], owner: str) -> Transformer:
    if len(layers) == 1:
        logger.info("student: keeping the first %d transformer layers of %s", layers[0], owner)
        return truncate_transformer(transformer, layers[0], owner=owner)
    indices = layer_indices(layers, transformer.auto_model.config.num_hidden_layers)
    logger.info("student: keeping transformer layers %s of %s", indices, owner)
    return select_layers(transformer, indices, owner=owner)


def _output_dimension(modules: list[nn.Module]) -> int:
    return next(m for m in reversed(modules) if isinstance(m, Pooling)).get_embedding_dimension()


def make_projection(in_features: int, out_features: int) -> Dense:
    return Dense(in_features, out_features, bias=False, activation_function=nn.Identity())


PROJECTION_RCOND = 1e-4


def fit_projection(projection: Dense, student_embeddings: np.ndarray, teacher_embeddings: np.ndarray) -> None:
    """Initialise the projection by least squares from student to teacher embeddings of the same texts.

    A random projection starts the student far from the teacher's space; the least-squares map starts it
    at the best linear alignment, so training spends its steps on the encoder rather than on the map.

    Directions in which the student's embeddings hardly vary (singular values below ``PROJECTION_RCOND`` times the
    largest) are left out of the fit. Some encoders have them: all-MiniLM-L6-v2's mean-pooled output is
    rank-deficient, and an exact fit put weights of norm 1e6 on those directions, so that the first optimiser
    step, however small, blew the student's embeddings up and training collapsed.
    """
    solution, *_ = np.linalg.lstsq(
        student_embeddings.astype(np.float64), teacher_embeddings.astype(np.float64), rcond=PROJECTION_RCOND
    )
    with torch.no_grad():
        projection.linear.weight.copy_(torch.from_numpy(solution.T).float())


def fit_orthogonal_projection(
    projection: Dense, student_embeddings: np.ndarray, teacher_embeddings: np.ndarray
) -> None:
    """Initialise the projection as the orthogonal map (Procrustes) closest to the teacher on the same texts.

    ``P = U V^T`` from ``SVD(X^T Y)`` (``X``: student ``[n, d_s]``, ``Y``: teacher ``[n, d_t]``, ``d_s <= d_t``), so
    ``P^T P = I``: every inner product and cosine of the student is kept exactly. A symmetric student sends its
    documents through ``P`` too, and a least-squares ``P`` warps its geometry before training starts
    (all-MiniLM-L6-v2 into all-mpnet-base-v2's space: SciFact nDCG@10 0.6451 as it is, 0.5774 through a
    least-squares map, 0.6451 through this one).
    """
    left, _, right = np.linalg.svd(
        student_embeddings.astype(np.float64).T @ teacher_embeddings.astype(np.float64), full_matrices=False
    )
    with torch.no_grad():
        projection.linear.weight.copy_(torch.from_numpy((left @ right).T).float())


def build_student(
    spec: str,
    teacher: SentenceTransformer,
    asymmetric: bool,
    device: str = "cpu",
    trust_remote_code: bool = False,
    layers: int | list[int] = 0,
    query_prompt: str = "",
) -> SentenceTransformer:
    """Build a student sentence-transformers model whose (query) embeddings live in the teacher's space.

    ``layers`` keeps some transformer layers of a named student model (see :func:`query_tower_modules`);
    ``query_prompt`` is put before every query the student embeds (saved with it).
    """
    tower = query_tower_modules(spec, teacher, device, trust_remote_code, layers)
    student_dim, teacher_dim = _output_dimension(tower), embedding_dimension(teacher)
    if student_dim != teacher_dim:
        logger.info("student: adding a %d -> %d projection into the teacher's space", student_dim, teacher_dim)
        tower.append(make_projection(student_dim, teacher_dim))
    if is_normalized(teacher):
        tower.append(Normalize())
    # Trainable weights stay in fp32 even when the teacher was loaded in half precision (autocast handles speed).
    # A ``teacher:N`` tower is a copy of the teacher, whose parameters an asymmetric student built earlier from the
    # same teacher object froze: the new tower starts trainable whatever the teacher's state.
    nn.Sequential(*tower).float().requires_grad_(True)
    if asymmetric:
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)
        # The query route is the default: a plain ``encode`` is the cheap side, not the teacher under another name.
        router = Router.for_query_document(
            query_modules=tower, document_modules=_modules_of(teacher), default_route=QUERY_ROUTE
        )
        # A plain ``encode`` takes the query route, so it takes the query prompt too (the default prompt name);
        # ``encode_document`` finds its "document" prompt first.
        prompts = {"query": query_prompt, "document": document_prompt(teacher)}
        default = "query" if query_prompt else None
        model = SentenceTransformer(modules=[router], device=device, prompts=prompts, default_prompt_name=default)
    else:  # documents go through the same tower, trained on plain documents: no document prompt
        model = SentenceTransformer(modules=tower, device=device, prompts={"query": query_prompt, "document": ""})
    return model


def student_query_prompt(option: str, spec: str, teacher: SentenceTransformer) -> str:
    """The query prompt a student is trained and saved with: ``auto`` is the teacher's query prompt for a
    ``teacher:N`` tower (the teacher's own layers, which read prompted queries) and none for another model;
    ``none`` is none; anything else is the prompt itself."""
    if option == "auto":
        return query_prompt(teacher) if _TEACHER_PREFIX.match(spec) else ""
    return "" if option == NO_PROMPT else option


def query_modules(student: SentenceTransformer) -> nn.Sequential:
    """The modules that embed a query: the Router's query route, or the whole model."""
    first = student[0]
    if isinstance(first, Router):
        return first.sub_modules[QUERY_ROUTE]
    return nn.Sequential(*_modules_of(student))


def document_view(student: SentenceTransformer) -> SentenceTransformer:
    """An asymmetric student's document route as a model of its own: the teacher's modules (shared, not copied)
    with the prompt the student's ``encode_document`` uses, so it embeds documents, and finds them in the
    teacher-embedding cache (:meth:`EmbeddingCache.find_for_documents`), as the teacher does."""
    route = student[0].sub_modules[DOCUMENT_ROUTE]
    prompts = {"document": document_prompt(student)}
    return SentenceTransformer(modules=list(route), device=str(student.device), prompts=prompts).eval()


def is_asymmetric(student: SentenceTransformer) -> bool:
    return isinstance(student[0], Router)


QUERY_ONLY = "embeddistill_query_only"  # set on the query-only student of a black-box teacher (models/query_student)


def searches_teacher_documents(student: SentenceTransformer) -> bool:
    """Whether the student's queries are scored against the teacher's document embeddings, not its own: an
    asymmetric student, or the query-only student of a black-box teacher (an endpoint or given vectors)."""
    return is_asymmetric(student) or bool(getattr(student, QUERY_ONLY, False))


def query_tokenizer(student: SentenceTransformer):
    return next(m for m in query_modules(student) if isinstance(m, Transformer)).tokenizer


def query_max_length(student: SentenceTransformer) -> int:
    return next(m for m in query_modules(student) if isinstance(m, Transformer)).max_seq_length


def projection_of(student: SentenceTransformer) -> Dense | None:
    return next((m for m in query_modules(student) if isinstance(m, Dense)), None)


def trainable_parameters(student: SentenceTransformer, freeze_word_embeddings: bool) -> list[nn.Parameter]:
    """Parameters the optimiser updates: the query tower (asymmetric) or the whole student (symmetric)."""
    modules = query_modules(student)
    if freeze_word_embeddings:
        # The token embedding table is most of a small student's parameters; it is already aligned with the
        # teacher's (for teacher:N it *is* the teacher's), and updating it on sparse queries mostly overfits.
        for name, parameter in modules.named_parameters():
            if "word_embeddings" in name or name.endswith("embed_tokens.weight"):
                parameter.requires_grad_(False)
    return [p for p in modules.parameters() if p.requires_grad]


def count_parameters(modules: nn.Module, include_embeddings: bool = True) -> int:
    """Parameters of ``modules``; without the embedding tables (lookups, not compute) when asked."""
    return sum(p.numel() for name, p in modules.named_parameters() if include_embeddings or "embeddings." not in name)


class QueryEncoder(nn.Module):
    """The online query encoder as one module: tokenized input -> embedding (what serving runs).

    ``prompt`` goes before every query text, as ``encode_query`` puts the model's query prompt there.
    """

    def __init__(self, modules: nn.Sequential, tokenizer, max_length: int, prompt: str = ""):
        super().__init__()
        self.modules_ = modules
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.prompt = prompt

    @classmethod
    def of(cls, model: SentenceTransformer) -> QueryEncoder:
        return cls(query_modules(model), query_tokenizer(model), query_max_length(model), query_prompt(model))

    def tokenize(self, texts: list[str], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        texts = [self.prompt + text for text in texts] if self.prompt else list(texts)
        features = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {k: v.to(device) for k, v in features.items()}

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.modules_(dict(features))["sentence_embedding"]

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        device = next(self.parameters()).device
        parts = [
            self(self.tokenize(texts[i : i + batch_size], device)).float().cpu().numpy()
            for i in range(0, len(texts), batch_size)
        ]
        return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)
