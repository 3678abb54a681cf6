"""A Hugging Face / sentence-transformers model card (``README.md``) for a distilled student folder.

``write_model_card(student_dir, summary)`` takes the :class:`~embeddistill.pipeline.summary.RunSummary` a
run returns (``RunSummary.from_dict`` reads a ``metrics.json`` back) and works for both lanes: a cross-encoder
run's card names the CE as the teacher and compares latency with the first stage. The run's ``config.yaml``
next to the student folder, when present, adds the losses and the full configuration. Loss descriptions come
from the config's help texts, so a new loss term appears here without an edit. A run without relevance labels
(a corpus-only folder) shows the student's label-free agreement with the teacher in place of retention.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from embeddistill.config import DistillConfig, LossConfig
from embeddistill.evaluation.latency import SPREAD_PERCENTILES
from embeddistill.losses import TERMS
from embeddistill.storage import atomic_write_text

if TYPE_CHECKING:  # the summary type only: evaluation never imports the pipeline at run time
    from embeddistill.pipeline.summary import RunSummary

TAGS = ["sentence-transformers", "embeddistill", "distillation", "feature-extraction"]
_HELP = {f.name: f.metadata["help"] for f in dataclasses.fields(LossConfig)}


def _number(value, digits: int = 4) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _millions(count: int | None) -> str:
    return f"{count / 1e6:.1f}M" if count else "?"


def _load_config(student_dir: Path, config: dict | None) -> dict:
    if config is not None:
        return config
    path = student_dir.parent / "config.yaml"
    if path.is_file():
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        return loaded if isinstance(loaded, dict) else {}
    return {}


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")  # "name" or "org/name", as the Hub spells them
DECLARED_NAME_KEY = "model_id"  # in a local folder's config_sentence_transformers.json: the Hub id it declares


def is_local_path(value: str) -> bool:
    """Whether ``value`` names something on this machine rather than a Hub id (what the loaders would do too)."""
    return bool(value) and (value.startswith(("/", "~", ".", "\\")) or Path(value).expanduser().exists())


def _snapshot_id(path: str) -> str | None:
    """``ORG/NAME`` of a Hugging Face cache snapshot (``.../models--ORG--NAME/snapshots/HASH``), else None."""
    for part in reversed(Path(path).parts):
        if part.startswith("models--"):
            return part.removeprefix("models--").replace("--", "/")
    return None


def public_name(value: str) -> str:
    """A model, dataset or folder as a published card may name it: a Hub id as it is; a local path by its folder
    name (a Hugging Face cache snapshot by its Hub id), never by where it lies on this machine."""
    if not isinstance(value, str) or not is_local_path(value):
        return value
    return _snapshot_id(value) or Path(value.rstrip("/\\")).expanduser().name


def _declared_name(folder: Path) -> str | None:
    try:
        config = json.loads((folder / "config_sentence_transformers.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    declared = config.get(DECLARED_NAME_KEY) if isinstance(config, dict) else None
    return declared if isinstance(declared, str) and "/" in declared and HUB_ID.match(declared) else None


def base_model_of(teacher: str) -> str | None:
    """The card's ``base_model``: only ever a Hub id. The teacher's own name when it is one, the Hub id of a Hugging
    Face cache snapshot, the ``model_id`` a local folder's ``config_sentence_transformers.json`` declares; else None
    (a local folder of unknown origin: pass ``base_model=`` to :func:`write_model_card` to say what it is)."""
    if not teacher:
        return None
    if not is_local_path(teacher):
        return teacher if HUB_ID.match(teacher) else None
    return _snapshot_id(teacher) or _declared_name(Path(teacher).expanduser())


def front_matter(summary: RunSummary, base_model: str | None = None) -> dict:
    meta = {"library_name": "sentence-transformers", "pipeline_tag": "sentence-similarity", "tags": list(TAGS)}
    base_model = base_model or base_model_of(summary.teacher.model)
    if base_model:
        meta["base_model"] = base_model
    return meta


def public_config(value):
    """The run's configuration with every local path replaced by :func:`public_name`."""
    if isinstance(value, dict):
        return {key: public_config(item) for key, item in value.items()}
    if isinstance(value, list):
        return [public_config(item) for item in value]
    return public_name(value)


def public_summary(summary: RunSummary) -> RunSummary:
    """The summary with its models and dataset named by :func:`public_name`."""

    def system(described):
        return dataclasses.replace(described, model=public_name(described.model))

    ce = summary.cross_encoder
    ce = dataclasses.replace(ce, first_stage=system(ce.first_stage)) if ce else None
    return dataclasses.replace(
        summary,
        dataset=public_name(summary.dataset),
        teacher=system(summary.teacher),
        student=system(summary.student),
        cross_encoder=ce,
    )


def retention_table(summary: RunSummary) -> str:
    teacher, student = summary.teacher, summary.student
    rows = ["| metric | teacher | student | retention |", "|---|---|---|---|"]
    for metric, retention in summary.retention.items():
        rows.append(
            f"| {metric} | {_number(teacher.metrics[metric])} | {_number(student.metrics[metric])} | "
            f"{_number(100 * retention, 1)}% |"
        )
    return "\n".join(rows)


def agreement_table(summary: RunSummary) -> str:
    """A run without labels: the student's label-free agreement with the teacher, as it started and as it ended."""
    agreement = summary.agreement or {"start": None}
    start = agreement["start"] or {}
    rows = [f"| metric | student at start | {summary.student_label} |", "|---|---|---|"]
    for metric, value in summary.student.metrics.items():
        rows.append(f"| {metric} | {_number(start.get(metric, '–'))} | {_number(value)} |")
    return "\n".join(rows)


def _evaluation(summary: RunSummary) -> str:
    """What the quality numbers were measured on: judged queries, or held-out ones against the teacher."""
    if summary.labelled:
        split = f"split `{summary.eval_split}` ({summary.eval_queries} queries)"
        return f"`{summary.dataset}`, {split}, exact inner-product search"
    queries = summary.agreement["queries"] if summary.agreement else 0
    return (
        f"label-free agreement with the teacher's own top 10 on {queries} held-out training queries "
        f"(`{summary.dataset}` has no relevance labels)"
    )


def _results(summary: RunSummary) -> str:
    evaluated = _evaluation(summary)
    if summary.labelled:
        return f"Retention (student / teacher) on {evaluated}:\n\n{retention_table(summary)}"
    return f"Quality: {evaluated}:\n\n{agreement_table(summary)}"


def speedup_table(summary: RunSummary) -> str:
    reference, student = summary.latency_reference.latency or {}, summary.student.latency or {}
    name = "first stage" if summary.cross_encoder else "teacher"
    rows = [f"| batch | {name} ms | student ms | speedup |", "|---|---|---|---|"]
    for batch, speedup in summary.speedup.items():
        key = f"{batch}_ms"
        rows.append(
            f"| {batch.removeprefix('batch')} | {_milliseconds(reference, key)} | "
            f"{_milliseconds(student, key)} | {_number(speedup, 2)}x |"
        )
    return "\n".join(rows)


def _milliseconds(latency: dict, key: str) -> str:
    """The median, and the p10-p90 spread of the repeats in brackets where the run recorded it."""
    low, high = (f"{key.removesuffix('_ms')}_p{p}_ms" for p in SPREAD_PERCENTILES)
    median = _number(latency.get(key), 2)
    return f"{median} ({latency[low]:.2f}-{latency[high]:.2f})" if low in latency and high in latency else median


def _architecture(summary: RunSummary, name: str) -> str:
    student, teacher = summary.student, summary.teacher
    size = _millions(student.query_encoder_parameters)
    if summary.cross_encoder is None and teacher.query_encoder_parameters is None:  # a black-box teacher
        return _query_only(summary, name, size)
    if student.asymmetric:
        return (
            f"An **asymmetric** student: queries go through a small query encoder (`{student.model}`, "
            f"{size} parameters) trained into the embedding space of "
            f"the teacher `{teacher.model}`; documents go through the teacher's own document tower, "
            "frozen. An index built with the teacher stays valid: only the online query side gets cheaper.\n\n"
            "```python\nfrom sentence_transformers import SentenceTransformer\n\n"
            f'model = SentenceTransformer("{name}")\n'
            'queries = model.encode_query(["does vitamin D prevent fractures?"])  # small query tower\n'
            'documents = model.encode_document(["Vitamin D and bone health ..."])  # the teacher\'s tower\n'
            "scores = model.similarity(queries, documents)\n```\n\n"
            "A plain `model.encode(...)` is the query side (the `Router`'s default route), as BEIR's wrappers "
            "and most code expect of a query encoder; embed documents with `encode_document`."
        )
    space = "distilled from the cross-encoder" if summary.cross_encoder else "in the embedding space of the teacher"
    return (
        f"A **symmetric** student (`{student.model}`, {size} parameters) that embeds both queries and documents "
        f"{space} `{teacher.model}`.\n\n"
        "```python\nfrom sentence_transformers import SentenceTransformer\n\n"
        f'model = SentenceTransformer("{name}")\n'
        'embeddings = model.encode(["does vitamin D prevent fractures?"])\n```'
    )


def _query_only(summary: RunSummary, name: str, size: str) -> str:
    """The card of a black-box teacher's student: a query encoder only, for the teacher's own document vectors."""
    return (
        f"A **query encoder** (`{summary.student.model}`, {size} parameters) trained into the embedding space of a "
        "teacher it could only call, or only had vectors of: it has no document side of its own. Search the "
        "teacher's document vectors (the index they already sit in) with its embeddings.\n\n"
        "```python\nfrom sentence_transformers import SentenceTransformer\n\n"
        f'model = SentenceTransformer("{name}")\n'
        'queries = model.encode(["does vitamin D prevent fractures?"])  # search the teacher\'s index with these\n```'
    )


def _losses(summary: RunSummary, config: DistillConfig | None) -> str:
    """Every weighted-in term (described by its config help text), negatives, distance and temperatures."""
    lines = []
    if config is not None:
        loss = config.loss
        for term in TERMS:  # an asymmetric student keeps the teacher's document tower: no document EM
            weight = getattr(loss, f"{term.part}_weight")
            if weight and not (summary.student.asymmetric and term.averaged_over == "documents"):
                lines.append(f"- {_HELP[f'{term.part}_weight'].removeprefix('weight of ')}: weight {weight}")
        lines.append(
            f"- hard negatives: {loss.hard_negatives} per query from the teacher's top "
            f"{loss.hard_negative_depth}; embedding-matching distance `{loss.em_distance}`"
        )
    temperatures = summary.training.get("temperatures")  # recorded by both lanes; absent in hand-made summaries
    if temperatures:
        lines.append(f"- softmax temperatures: teacher {temperatures[0]}, student {temperatures[1]}")
    return "\n".join(lines) or "(the run's config.yaml was not found next to the student folder)"


def render_model_card(
    summary: RunSummary, config: dict | None = None, name: str = "student", base_model: str | None = None
) -> str:
    config = config or {}
    typed = DistillConfig.from_dict(config) if config else None
    meta = yaml.safe_dump(front_matter(summary, base_model), sort_keys=False, allow_unicode=True).strip()
    summary, configuration = public_summary(summary), _configuration(public_config(config))
    counts, timings, environment = summary.training_queries, summary.timings, summary.environment
    teacher = summary.teacher
    return f"""---
{meta}
---

# {name}: an EmbedDistill student of `{teacher.model}`

Distilled with [embeddistill](https://arxiv.org/abs/2301.12005) (EmbedDistill: geometric knowledge distillation
for information retrieval).

## Model

{_architecture(summary, name)}

## Teacher

`{teacher.model}` ({_teacher_size(summary)}).

## Data

- dataset: `{summary.dataset}`
- training queries: {counts.get("labelled", 0)} labelled, {counts.get("extra", 0)} extra unlabeled, \
{counts.get("generated", 0)} generated
- evaluation: {_evaluation(summary)}

## Losses

{_losses(summary, typed)}

## Results

{_results(summary)}

Query-encoding CPU latency (median ms per batch, tokenisation included, p10-p90 of the repeats in brackets, \
{environment.threads} threads, torch {environment.torch}):

{speedup_table(summary)}

Training: {summary.training["steps"]} steps in {_number(timings["train_seconds"], 0)} s; \
total run {_number(timings["total_seconds"], 0)} s.

## Configuration

{configuration}
"""


def _configuration(config: dict) -> str:
    if not config:
        return "(not recorded)"
    return "```yaml\n" + yaml.safe_dump(config, sort_keys=False, allow_unicode=True).strip() + "\n```"


def _teacher_size(summary: RunSummary) -> str:
    if summary.cross_encoder:
        return f"a {summary.teacher.kind} cross-encoder reranking the top {summary.teacher.rerank_depth}"
    if summary.teacher.query_encoder_parameters is None:  # a teacher behind an API, or given as vectors
        return "a black-box teacher (an endpoint or given vectors): its size is not known"
    return f"{_millions(summary.teacher.query_encoder_parameters)} parameters in its query path"


def write_model_card(
    student_dir: str | os.PathLike, summary: RunSummary, config: dict | None = None, base_model: str | None = None
) -> Path:
    """Write ``README.md`` into ``student_dir`` (replacing sentence-transformers' generic card); return its path.

    ``config``: the run configuration as a dict; by default read from ``config.yaml`` beside ``student_dir``.
    ``base_model``: the Hub id of the teacher for the front matter (default: :func:`base_model_of` the teacher;
    none for a local folder of unknown origin). The card names local models, datasets and folders by their folder
    name only (:func:`public_name`): it is published with the student, and where files lay on the machine that
    trained it is no one else's business and no use to them.
    """
    student_dir = Path(student_dir)
    if not student_dir.is_dir():
        raise FileNotFoundError(f"student folder {student_dir} does not exist")
    card = render_model_card(summary, _load_config(student_dir, config), student_dir.name, base_model)
    path = student_dir / "README.md"
    atomic_write_text(path, card)
    return path
