"""A Hugging Face / sentence-transformers model card (``README.md``) for a distilled student folder.

``write_model_card(student_dir, summary)`` takes the summary that ``pipeline.distill`` returns (and
``metrics.json`` holds): teacher, student, retention, speedup, training_queries, training, timings. The run's
``config.yaml`` next to the student folder, when present, adds the losses and the full configuration.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import yaml

from embeddistill.storage import atomic_write_text

TAGS = ["sentence-transformers", "embeddistill", "distillation", "feature-extraction"]
LOSS_FIELDS = {
    "score_weight": "score distillation (softmax cross-entropy over the teacher's candidate scores)",
    "query_em_weight": "query embedding matching",
    "document_em_weight": "document embedding matching",
    "label_weight": "in-batch label loss on labelled positives",
    "margin_mse_weight": "Margin-MSE against the anchor document",
}


def _number(value, digits: int = 4) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _millions(count) -> str:
    return f"{count / 1e6:.1f}M" if isinstance(count, int | float) and count else "?"


def _load_config(student_dir: Path, config: dict | None) -> dict:
    if config is not None:
        return config
    path = student_dir.parent / "config.yaml"
    if path.is_file():
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        return loaded if isinstance(loaded, dict) else {}
    return {}


def _section(config: dict, name: str) -> dict:
    value = config.get(name)
    return value if isinstance(value, dict) else {}


def hub_name(teacher: str) -> str:
    """The teacher as a Hub-style name.

    A Hugging Face cache snapshot (``.../models--ORG--NAME/snapshots/HASH``) becomes ``ORG/NAME``; any other local
    folder (e.g. an offline copy) its folder name (pass ``base_model=`` to :func:`write_model_card` to say more).
    """
    looks_local = teacher.startswith(("/", ".", "~")) or Path(teacher).expanduser().exists()
    if not looks_local:
        return teacher
    for part in reversed(Path(teacher).parts):
        if part.startswith("models--"):
            return part.removeprefix("models--").replace("--", "/")
    return Path(teacher.rstrip("/")).name


def front_matter(summary: dict, config: dict, base_model: str | None = None) -> dict:
    teacher = summary.get("teacher", {}).get("model") or _section(config, "model").get("teacher", "")
    meta = {
        "library_name": "sentence-transformers",
        "pipeline_tag": "sentence-similarity",
        "tags": list(TAGS),
    }
    if base_model or teacher:
        meta["base_model"] = base_model or hub_name(teacher)
    return meta


def retention_table(summary: dict) -> str:
    teacher, student = summary.get("teacher", {}), summary.get("student", {})
    rows = ["| metric | teacher | student | retention |", "|---|---|---|---|"]
    for metric, retention in summary.get("retention", {}).items():
        rows.append(
            f"| {metric} | {_number(teacher.get(metric))} | {_number(student.get(metric))} | "
            f"{_number(100 * retention, 1)}% |"
        )
    return "\n".join(rows)


def speedup_table(summary: dict) -> str:
    teacher, student = summary.get("teacher", {}), summary.get("student", {})
    rows = ["| batch | teacher ms | student ms | speedup |", "|---|---|---|---|"]
    for batch, speedup in summary.get("speedup", {}).items():
        key = f"{batch}_ms"
        rows.append(
            f"| {batch.removeprefix('batch')} | {_number(teacher.get('latency', {}).get(key), 2)} | "
            f"{_number(student.get('latency', {}).get(key), 2)} | {_number(speedup, 2)}x |"
        )
    return "\n".join(rows)


def render_model_card(
    summary: dict, config: dict | None = None, name: str = "student", base_model: str | None = None
) -> str:
    config = config or {}
    teacher, student = summary.get("teacher", {}), summary.get("student", {})
    asymmetric = student.get("asymmetric", _section(config, "model").get("asymmetric", True))
    counts = summary.get("training_queries", {})
    training, timings = summary.get("training", {}), summary.get("timings", {})
    environment = summary.get("environment", {})
    loss = _section(config, "loss")
    meta = yaml.safe_dump(front_matter(summary, config, base_model), sort_keys=False, allow_unicode=True).strip()

    if asymmetric:
        architecture = (
            f"An **asymmetric** student: queries go through a small query encoder (`{student.get('model', '?')}`, "
            f"{_millions(student.get('query_encoder_parameters'))} parameters) trained into the embedding space of "
            f"the teacher `{teacher.get('model', '?')}`; documents go through the teacher's own document tower, "
            "frozen. An index built with the teacher stays valid: only the online query side gets cheaper.\n\n"
            "```python\nfrom sentence_transformers import SentenceTransformer\n\n"
            f'model = SentenceTransformer("{name}")\n'
            'queries = model.encode_query(["does vitamin D prevent fractures?"])  # small query tower\n'
            'documents = model.encode_document(["Vitamin D and bone health ..."])  # the teacher\'s tower\n'
            "scores = model.similarity(queries, documents)\n```"
        )
    else:
        architecture = (
            f"A **symmetric** student (`{student.get('model', '?')}`, "
            f"{_millions(student.get('query_encoder_parameters'))} parameters) that embeds both queries and documents "
            f"in the embedding space of the teacher `{teacher.get('model', '?')}`.\n\n"
            "```python\nfrom sentence_transformers import SentenceTransformer\n\n"
            f'model = SentenceTransformer("{name}")\n'
            'embeddings = model.encode(["does vitamin D prevent fractures?"])\n```'
        )

    # An asymmetric student keeps the teacher's document tower: document embedding matching does not apply.
    applicable = [f for f in LOSS_FIELDS if not (asymmetric and f == "document_em_weight")]
    losses = [f"- {LOSS_FIELDS[f]}: weight {loss[f]}" for f in applicable if loss.get(f)]
    if loss:
        losses.append(
            f"- hard negatives: {loss.get('hard_negatives', '?')} per query from the teacher's top "
            f"{loss.get('hard_negative_depth', '?')}; embedding-matching distance `{loss.get('em_distance', '?')}`"
        )
    temperatures = training.get("temperatures")
    if temperatures:
        losses.append(f"- softmax temperatures: teacher {temperatures[0]}, student {temperatures[1]}")
    losses_text = "\n".join(losses) or "(the run's config.yaml was not found next to the student folder)"

    configuration = (
        "```yaml\n" + yaml.safe_dump(config, sort_keys=False, allow_unicode=True).strip() + "\n```"
        if config
        else "(not recorded)"
    )
    evaluated = (
        f"`{summary.get('dataset', '?')}`, split `{summary.get('eval_split', '?')}` "
        f"({summary.get('eval_queries', '?')} queries), exact inner-product search"
    )
    return f"""---
{meta}
---

# {name}: an EmbedDistill student of `{teacher.get("model", "?")}`

Distilled with [embeddistill](https://arxiv.org/abs/2301.12005) (EmbedDistill: geometric knowledge distillation
for information retrieval).

## Model

{architecture}

## Teacher

`{teacher.get("model", "?")}` ({_millions(teacher.get("query_encoder_parameters"))} parameters in its query path).

## Data

- dataset: `{summary.get("dataset", "?")}`
- training queries: {counts.get("labelled", 0)} labelled, {counts.get("extra", 0)} extra unlabeled, \
{counts.get("generated", 0)} generated
- evaluation: {evaluated}

## Losses

{losses_text}

## Results

Retention (student / teacher) on {evaluated}:

{retention_table(summary)}

Query-encoding CPU latency (median ms per batch, tokenisation included, \
{environment.get("threads", "?")} threads, torch {environment.get("torch", "?")}):

{speedup_table(summary)}

Training: {training.get("steps", "?")} steps in {_number(timings.get("train_seconds"), 0)} s; \
total run {_number(timings.get("total_seconds"), 0)} s.

## Configuration

{configuration}
"""


def write_model_card(
    student_dir: str | os.PathLike, summary: dict, config: dict | None = None, base_model: str | None = None
) -> Path:
    """Write ``README.md`` into ``student_dir`` (replacing sentence-transformers' generic card); return its path.

    ``config``: the run configuration as a dict; by default read from ``config.yaml`` beside ``student_dir``.
    ``base_model``: the Hub name of the teacher for the front matter (default: the teacher's name, or the folder
    name of a local teacher path).
    """
    student_dir = Path(student_dir)
    if not student_dir.is_dir():
        raise FileNotFoundError(f"student folder {student_dir} does not exist")
    card = render_model_card(summary, _load_config(student_dir, config), student_dir.name, base_model)
    path = student_dir / "README.md"
    atomic_write_text(path, card)
    return path
