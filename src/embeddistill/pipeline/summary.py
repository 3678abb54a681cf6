"""The typed result of one ``distill`` run, shared by both lanes and everything that reads a run.

A run's stages, the report, the model card, the CLI and the benchmarks used to pass around one untyped ``dict``
and read it with ``.get(..., '?')``; they now share :class:`RunSummary`. ``metrics.json`` is still the same JSON
(committed results and tests read it): :meth:`RunSummary.to_dict` writes exactly the keys a run wrote before, and
:meth:`RunSummary.from_dict` reads such a file back.

Both lanes fill the same shape: a ``teacher`` (the dual-encoder teacher, or the cross-encoder reranking the first
stage), the ``student``, the student's ``retention`` relative to the teacher and its query-encoding ``speedup``.
A cross-encoder run adds :class:`CrossEncoderParts` (the first stage and the pairing diagnostics). A run without
judged queries (a corpus-only folder) has no retention: the student's metrics are its label-free agreement with the
teacher, and ``metrics.json`` adds ``label_free_agreement`` (:attr:`RunSummary.agreement`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from embeddistill.evaluation.latency import medians
from embeddistill.runtime import environment_record

# metrics.json keeps the loss-weight names committed cross-encoder results use (training.loss_weights).
_METRICS_WEIGHT_KEYS = {"query_em": "query_embedding", "document_em": "document_embedding"}
_SYSTEM_HEAD = ("asymmetric", "kind", "rerank_depth")
_SYSTEM_TAIL = ("latency", "query_encoder_parameters", "query_encoder_compute_parameters", "parameters")


@dataclass
class System:
    """One evaluated system: its model name, its metric values and, where measured, its size and CPU latency."""

    model: str
    metrics: dict[str, float]
    latency: dict[str, float] | None = None
    query_encoder_parameters: int | None = None
    query_encoder_compute_parameters: int | None = None
    asymmetric: bool | None = None
    kind: str | None = None
    rerank_depth: int | None = None
    parameters: int | None = None

    def to_dict(self) -> dict:
        """``model``, the descriptive fields, the metrics, then sizes and latency: the layout of ``metrics.json``."""
        head = {name: getattr(self, name) for name in _SYSTEM_HEAD if getattr(self, name) is not None}
        tail = {name: getattr(self, name) for name in _SYSTEM_TAIL if getattr(self, name) is not None}
        return {"model": self.model, **head, **self.metrics, **tail}

    @classmethod
    def from_dict(cls, values: dict) -> System:
        known = {"model", *_SYSTEM_HEAD, *_SYSTEM_TAIL}
        metrics = {k: v for k, v in values.items() if k not in known}
        return cls(values["model"], metrics, **{k: v for k, v in values.items() if k in known - {"model"}})


@dataclass
class Environment:
    """What CPU timings and numbers depend on: versions, the machine, torch's threads and the training device."""

    embeddistill: str
    torch: str
    python: str | None = None
    machine: str | None = None
    threads: int | None = None
    device: str | None = None

    @classmethod
    def current(cls) -> Environment:
        """This process's record, from :func:`embeddistill.runtime.environment_record` (the one place it is made)."""
        record = environment_record(("embeddistill", "torch"))
        versions, machine = record["versions"], record["machine"]
        return cls(
            versions["embeddistill"],
            versions["torch"],
            versions["python"],
            machine["cpu"],
            machine["torch_threads"],
            machine["gpu"] or "cpu",
        )

    def to_dict(self) -> dict:
        return {name: value for name, value in vars(self).items() if value is not None}


@dataclass
class CrossEncoderParts:
    """What only a cross-encoder run has: the first stage, retention relative to it, and the candidates' pairing."""

    first_stage: System
    retention_vs_first_stage: dict[str, float]
    pairing: dict[str, float]
    candidates_per_query: int


@dataclass
class RunSummary:
    """Everything a run measured. ``teacher`` is the dual-encoder teacher, or for a cross-encoder run the CE
    reranking the first stage (written as ``cross_encoder``); ``speedup`` is relative to the teacher's query
    encoder, or to the first stage's (a CE has no query encoder of its own)."""

    dataset: str
    eval_split: str
    eval_queries: int
    teacher: System
    student: System
    retention: dict[str, float]
    speedup: dict[str, float]
    training_queries: dict[str, int]
    training: dict
    timings: dict[str, float]
    environment: Environment
    cross_encoder: CrossEncoderParts | None = None
    teacher_api: dict | None = None  # a black-box teacher's endpoint: requests, texts sent, cache hits, waiting
    baselines: dict[str, System] = field(default_factory=dict)  # off-the-shelf models, each with its own index

    def versus_baselines(self) -> list[tuple[bool, str]]:
        """Per baseline: whether the student is below it on the first metric both have, and a sentence saying so."""
        verdicts = []
        for name, baseline in self.baselines.items():
            metric = next((m for m in self.student.metrics if m in baseline.metrics), None)
            if metric is None:
                continue
            ours, theirs = self.student.metrics[metric], baseline.metrics[metric]
            where = "above" if ours > theirs else "level with" if ours == theirs else "below"
            sentence = f"The student is {where} `{name}` as it comes: {metric} {ours:.4f} against {theirs:.4f}."
            if ours < theirs:
                sentence += f" Serving `{name}` as it comes would be better here."
            verdicts.append((ours < theirs, sentence))
        return verdicts

    @property
    def labelled(self) -> bool:
        """Whether quality was measured on judged queries; else it is the label-free agreement (corpus-only)."""
        return self.eval_queries > 0

    @property
    def agreement(self) -> dict | None:
        """The label-free check of a run without labels: ``metric``, ``queries``, the student's scores at the
        ``start`` (``None`` when not checked) and at the ``kept`` step; ``None`` for a labelled run."""
        validation = self.training.get("validation")
        if self.labelled or not validation:
            return None
        start = validation.get("start")
        return {
            "metric": validation["metric"],
            "queries": validation["queries"],
            "start": _scores(start) if start else None,
            "kept_step": validation["kept_step"],
            "kept": kept_agreement(validation),
        }

    @property
    def student_label(self) -> str:
        """``student``; in a run without labels ``student (step N)``, the step whose weights it kept, and the share of
        its starting weights averaged back in (``start_weight``) where there is one."""
        agreement = self.agreement
        if not agreement:
            return "student"
        weight = self.training.get("start_weight") or 0.0
        averaged = f", averaged with its start at {weight:g}" if weight else ""
        return f"student (step {agreement['kept_step']}{averaged})"

    @property
    def trec_runs(self) -> list[str]:
        """The TREC run files the run wrote next to ``metrics.json`` (none without judged queries)."""
        if not self.labelled:
            return []
        systems = ["first_stage", "cross_encoder"] if self.cross_encoder else ["teacher"]
        return [f"{name}.trec" for name in (*systems, "student")]

    @property
    def latency_reference(self) -> System:
        """The system whose query encoder the student's latency is compared with."""
        return self.cross_encoder.first_stage if self.cross_encoder else self.teacher

    @property
    def teacher_label(self) -> str:
        if self.cross_encoder:
            return f"cross-encoder reranker (top {self.teacher.rerank_depth})"
        return "teacher"

    def to_dict(self) -> dict:
        """The ``metrics.json`` of the run (the keys it has always had; a CE run adds latency and speedup)."""
        head = {"dataset": self.dataset, "eval_split": self.eval_split, "eval_queries": self.eval_queries}
        tail = {
            "training_queries": self.training_queries,
            "training": _training_dict(self.training),
            "timings": self.timings,
            "environment": self.environment.to_dict(),
        }
        if self.teacher_api is not None:
            tail["teacher_api"] = self.teacher_api
        if self.cross_encoder is None:
            systems = {"teacher": self.teacher.to_dict(), "student": self.student.to_dict()}
            if self.baselines:
                systems["baselines"] = {name: system.to_dict() for name, system in self.baselines.items()}
            label_free = {"label_free_agreement": self.agreement} if not self.labelled else {}
            return {**head, **systems, "retention": self.retention, "speedup": self.speedup, **label_free, **tail}
        ce = self.cross_encoder
        return {
            **head,
            "first_stage": ce.first_stage.to_dict(),
            "cross_encoder": self.teacher.to_dict(),
            "student": self.student.to_dict(),
            "retention_vs_cross_encoder": self.retention,
            "retention_vs_first_stage": ce.retention_vs_first_stage,
            "speedup": self.speedup,
            "pairing": ce.pairing,
            "candidates_per_query": ce.candidates_per_query,
            **tail,
        }

    @classmethod
    def from_dict(cls, values: dict) -> RunSummary:
        """Read a ``metrics.json`` (either lane's) back; fields a file lacks are ``None`` or empty."""
        cross_encoder = None
        if "cross_encoder" in values:
            cross_encoder = CrossEncoderParts(
                System.from_dict(values["first_stage"]),
                values.get("retention_vs_first_stage", {}),
                values.get("pairing", {}),
                values.get("candidates_per_query", 0),
            )
        return cls(
            values["dataset"],
            values["eval_split"],
            values["eval_queries"],
            System.from_dict(values["cross_encoder" if cross_encoder else "teacher"]),
            System.from_dict(values["student"]),
            values["retention_vs_cross_encoder" if cross_encoder else "retention"],
            values.get("speedup", {}),
            values.get("training_queries", {}),
            values.get("training", {}),
            values.get("timings", {}),
            Environment(**values.get("environment", {"embeddistill": "", "torch": ""})),
            cross_encoder,
            values.get("teacher_api"),
            {name: System.from_dict(system) for name, system in values.get("baselines", {}).items()},
        )


def kept_agreement(validation: dict | None) -> dict[str, float]:
    """The label-free scores of the weights the run ended with (its ``kept_step``, averaged with the start where
    ``start_weight`` says so); empty when never checked."""
    if not validation:
        return {}
    if "merged" in validation:
        return dict(validation["merged"])
    kept = next(check for check in validation["history"] if check["step"] == validation["kept_step"])
    return _scores(kept)


def _scores(check: dict) -> dict[str, float]:
    return {name: value for name, value in check.items() if name != "step"}


def _training_dict(training: dict) -> dict:
    if "loss_weights" not in training:
        return training
    weights = {_METRICS_WEIGHT_KEYS.get(k, k): v for k, v in training["loss_weights"].items()}
    return {**training, "loss_weights": weights}


def ratios(numerators: dict[str, float], denominators: dict[str, float]) -> dict[str, float]:
    """``numerators[k] / denominators[k]`` for every key of ``denominators`` (NaN where it is zero)."""
    return {k: float(numerators[k] / d) if d else float("nan") for k, d in denominators.items()}


def speedup(reference: dict[str, float], student: dict[str, float]) -> dict[str, float]:
    """Reference latency over student latency per batch size (``batch1_ms`` -> ``batch1``), of the medians."""
    return {key.removesuffix("_ms"): value for key, value in ratios(reference, medians(student)).items()}
