"""Which kind of black-box teacher a ``distill`` run names, and the checks of its options (before anything loads).

* ``--teacher http(s)://HOST/v1`` (or ``openai:URL``): an OpenAI-compatible ``/v1/embeddings`` endpoint embeds
  documents and queries (:mod:`embeddistill.models.api_teacher`).
* ``--teacher-documents PATH``: the teacher's document embeddings are given (``.npy`` with an ids file beside it,
  Parquet, or an ``embeddistill index`` folder); the queries come from ``--teacher URL`` or ``--teacher-queries``
  (:mod:`embeddistill.models.vector_teacher`).

Either way the teacher lends no layers and no document tower: the student is built from ``--student`` (a local
model, e.g. with ``--student-layers 0 -1``) and is asymmetric, searching the teacher's own document vectors.
"""

from __future__ import annotations

import os

API_PREFIX = "openai:"


def api_url(teacher: str) -> str:
    """The endpoint URL a ``--teacher`` value names, or ``""`` when it names a local or hub model."""
    url = teacher[len(API_PREFIX) :] if teacher.startswith(API_PREFIX) else teacher
    return url if url.startswith(("http://", "https://")) else ""


def is_black_box(config) -> bool:
    """Whether the run's teacher is an endpoint or a set of vectors (the black-box lane), not a local model."""
    return bool(api_url(config.model.teacher) or config.api.teacher_documents)


def api_problems(config) -> list[str]:
    """What cannot work in a black-box teacher's options; each names its flag."""
    if not is_black_box(config):
        if config.api.teacher_queries:
            return ["--teacher-queries needs --teacher-documents (the document vectors those queries search)"]
        return []
    problems = []
    model, api = config.model, config.api
    url = api_url(model.teacher)
    if model.teacher and not url:
        problems.append(
            f"--teacher {model.teacher} with --teacher-documents: the teacher is its vectors; give --teacher an "
            "endpoint URL (http://.../v1) for the queries, or leave it out and give --teacher-queries"
        )
    if not url and not api.teacher_queries:
        problems.append("--teacher-documents needs query embeddings: --teacher URL (an endpoint) or --teacher-queries")
    if model.student.startswith("teacher:"):
        problems.append(
            f"--student {model.student}: a black-box teacher lends no layers; give a local model, e.g. "
            "--student sentence-transformers/all-MiniLM-L6-v2 --student-layers 0 -1"
        )
    if not model.asymmetric:
        problems.append("--no-asymmetric: a black-box teacher has no document tower to train against")
    if config.ce.cross_encoder:
        problems.append("--cross-encoder with an API or vector teacher: choose one teacher")
    if url and api.teacher_api_key_env and not os.environ.get(api.teacher_api_key_env):
        problems.append(
            f"--teacher-api-key-env {api.teacher_api_key_env}: that environment variable is not set (export it, or "
            "leave the option out for an endpoint without a key)"
        )
    for name, prompt in (("teacher_documents", "document_prompt"), ("teacher_queries", "query_prompt")):
        if getattr(api, name) and getattr(model, prompt) not in ("", "none"):
            problems.append(
                f"--{prompt.replace('_', '-')} with --{name.replace('_', '-')}: those vectors are given, so no prompt "
                "can be put before their texts now (it was, or was not, when they were made); leave the option out"
            )
    for name in ("teacher_documents", "teacher_queries"):
        path = getattr(api, name)
        if path and not os.path.exists(os.path.expanduser(path)):
            problems.append(f"--{name.replace('_', '-')} {path}: no such file or folder")
    return problems
