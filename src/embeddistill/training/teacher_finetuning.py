"""Fine-tuning a cross-encoder teacher (``embeddistill train-teacher``): dual-pooling, or standard for comparison.

The training half of the cross-encoder code: examples with hard negatives from a first stage, the trainer and the
entry point. The model classes live in :mod:`embeddistill.models.cross_encoders`; this module only trains them.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from embeddistill.checks import check_teacher_training, record_settings
from embeddistill.config import TeacherTrainingConfig
from embeddistill.losses import LabelLoss, ScoreDistillationLoss
from embeddistill.models.classification_cross_encoder import ClassificationCrossEncoder
from embeddistill.models.cross_encoders import DUAL_POOLING_CONFIG, CrossEncoderTeacher, DualPoolingCrossEncoder
from embeddistill.runtime import forward_context, resolve_device, seed_everything
from embeddistill.training.loop import LoopSettings, TrainingLoop

logger = logging.getLogger(__name__)


@dataclass
class TeacherExample:
    """One training query: text, the texts of its positives, and its hard-negative pool."""

    query: str
    positives: list[str]
    negatives: list[str]


def collect_teacher_examples(config: TeacherTrainingConfig, device: str) -> list[TeacherExample]:
    """Labelled queries of every dataset's ``split``, with hard negatives from a dual encoder's top documents.

    Negatives are the first stage's top ``hard_negative_depth`` documents minus every judged-relevant one; without
    ``negatives_from`` they are random corpus documents. With ``positives_in_pool`` (default) a query's positives
    are its judged-relevant documents that the first stage also ranks in its top ``hard_negative_depth + 50`` (all of
    them where it ranks none): positives and negatives then come from the same (reranking) distribution. Without
    it, on collections with many weak judgements (NFCorpus: about 40 per query, most of them far from the query)
    the positive is usually a document the first stage ranks low and every negative one it ranks high, and the CE
    learns to prefer what the first stage does not: it reranked NFCorpus at the level of a random order
    (``benchmarks/results/cross_encoder.json``).
    """
    from embeddistill.data import RetrievalDataset
    from embeddistill.models.teachers import DualEncoderTeacher
    from embeddistill.serving.indexing import FlatIndex

    first_stage = None
    if config.negatives_from:
        first_stage = DualEncoderTeacher.load(config.negatives_from, cache_dir=config.cache_dir or None, device=device)
    examples: list[TeacherExample] = []
    rng = random.Random(config.seed)
    for name in config.datasets:
        dataset = RetrievalDataset.load(name)
        qrels = dataset.qrels(config.split)
        query_ids = sorted(qrels)
        doc_ids = list(dataset.corpus)
        if first_stage is not None:
            documents = first_stage.embed_documents([dataset.corpus[d] for d in doc_ids], desc=f"{name} corpus")
            queries = first_stage.embed_queries([dataset.queries[q] for q in query_ids], desc=f"{name} queries")
            _, top = FlatIndex(documents, doc_ids).search(queries, config.hard_negative_depth + 50)
        for i, query_id in enumerate(query_ids):
            relevant = {d for d, rel in qrels[query_id].items() if rel > 0}
            if not relevant:
                continue
            if first_stage is not None:
                pool = [doc_ids[r] for r in top[i] if r >= 0 and doc_ids[r] not in relevant]
            else:
                pool = [d for d in rng.sample(doc_ids, min(len(doc_ids), 4 * config.group_size)) if d not in relevant]
            pool = pool[: config.hard_negative_depth]
            if not pool:
                continue
            positives = sorted(relevant)
            if first_stage is not None and config.positives_in_pool:
                found = [doc_ids[r] for r in top[i] if r >= 0 and doc_ids[r] in relevant]
                positives = found or positives
            examples.append(
                TeacherExample(
                    dataset.queries[query_id],
                    [dataset.corpus[d] for d in positives],
                    [dataset.corpus[d] for d in pool],
                )
            )
        logger.info("train-teacher: %s: %d training queries", name, len(query_ids))
    if not examples:
        raise ValueError("train-teacher: no labelled training queries with negatives in " + ", ".join(config.datasets))
    return examples


class CrossEncoderTrainer:
    """Fine-tunes a :class:`DualPoolingCrossEncoder` (or a :class:`ClassificationCrossEncoder`, whose logits need no
    temperature: ``tau`` = 1) on groups ``[positive, negatives...]`` per query.

    Loss per step (``B`` queries, ``G`` documents each, column 0 the positive):
    ``w_label * LabelLoss(s / tau)`` (softmax cross-entropy against the positive), plus, with a standard CE to
    distil (``distill_from``), ``w_distill * ScoreDistillationLoss`` between its logits (temperature 1) and ``s``
    (temperature ``tau``). Epoch ``e`` draws, for every query, one positive and ``G - 1`` negatives from its pool,
    seeded by ``(seed, e)``. The schedule, log and checkpoints (every ``checkpoint_every`` steps, so that
    ``--resume`` continues where a run stopped) are :class:`~embeddistill.training.loop.TrainingLoop`'s.
    """

    def __init__(
        self,
        model: DualPoolingCrossEncoder | ClassificationCrossEncoder,
        examples: list[TeacherExample],
        config: TeacherTrainingConfig,
        distill_teacher: CrossEncoderTeacher | None = None,
    ):
        self.model, self.examples, self.config = model, examples, config
        self.device = resolve_device(config.device)
        self.model.to(self.device)
        self.distill_teacher = distill_teacher
        tau = config.temperature if config.normalize and isinstance(model, DualPoolingCrossEncoder) else 1.0
        self.label_loss = LabelLoss(tau)
        self.distill_loss = ScoreDistillationLoss(1.0, tau)
        parameters = list(model.parameters())
        self.optimizer = torch.optim.AdamW(
            [p for p in parameters if p.requires_grad], lr=config.learning_rate, weight_decay=config.weight_decay
        )
        self.steps_per_epoch = math.ceil(len(examples) / config.batch_size)
        self.total_steps = self.steps_per_epoch * config.epochs
        self.out = Path(config.out)
        self.checkpoint_dir = self.out.parent / f"{self.out.name}.checkpoint"
        self.log_path = self.out.parent / f"{self.out.name}.train_log.jsonl"
        self.loop = TrainingLoop(
            LoopSettings.of(config, self.total_steps),
            model,
            self.optimizer,
            parameters,
            self.checkpoint_dir,
            self.log_path,
            self.device,
            name="train-teacher",
            log_prefix="train-teacher: ",
            final_checkpoint=False,  # the saved model is the result; a finished run is not resumed
        )

    def learning_rate(self, step: int) -> float:
        return self.loop.learning_rate(step)

    def batch(self, step: int) -> tuple[list[str], list[str], int]:
        """Query and document texts (each query repeated ``G`` times, positive first) of one step, and ``G``."""
        epoch, position = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.config.seed, epoch]).permutation(len(self.examples))
        rows = order[position * self.config.batch_size : (position + 1) * self.config.batch_size]
        rng = np.random.default_rng([self.config.seed, epoch, position])
        group = self.config.group_size
        queries, documents = [], []
        for row in rows:
            example = self.examples[row]
            negatives = [example.negatives[i] for i in rng.permutation(len(example.negatives))[: group - 1]]
            while len(negatives) < group - 1:  # a short pool repeats itself rather than changing the group size
                negatives.append(example.negatives[len(negatives) % len(example.negatives)])
            positive = example.positives[int(rng.integers(len(example.positives)))]
            queries += [example.query] * group
            documents += [positive, *negatives]
        return queries, documents, group

    def step(self, step: int) -> dict[str, float]:
        queries, documents, group = self.batch(step)
        features = self.model.tokenize(queries, documents, self.device)
        with forward_context(self.device, bf16=self.device.type == "cuda"):
            scores = self.model(features)[0].float().view(-1, group)
        targets = torch.zeros(scores.shape[0], dtype=torch.long, device=self.device)
        parts = {"label": self.label_loss(scores, targets)}
        if self.distill_teacher is not None:
            teacher = self.distill_teacher.predict(queries, documents, batch_size=len(queries)).scores
            teacher_scores = torch.from_numpy(teacher).to(self.device).view(-1, group)
            parts["distill"] = self.distill_loss(scores, teacher_scores)
        loss = self.config.label_weight * parts["label"] + self.config.distill_weight * parts.get("distill", 0.0)
        return self.loop.optimise({"loss": loss, **parts}, step)

    def train(self) -> dict:
        """Train to the end (or on from the checkpoint, with ``resume``); steps, timing and the number of queries."""
        return {**self.loop.run(self.step), "queries": len(self.examples)}

    def save_checkpoint(self, step: int) -> None:
        self.loop.save_checkpoint(step)


def base_model(config: TeacherTrainingConfig, device: str) -> DualPoolingCrossEncoder | ClassificationCrossEncoder:
    """The model ``--architecture`` asks for, on ``--base`` (a dual-pooling folder continues its own training)."""
    if config.architecture == "standard":
        return ClassificationCrossEncoder.from_encoder(config.base, config.max_length, device, config.trust_remote_code)
    if (Path(config.base) / DUAL_POOLING_CONFIG).is_file():
        model = DualPoolingCrossEncoder.load(config.base, device, config.trust_remote_code)
        model.config.temperature, model.config.max_length = config.temperature, config.max_length
        model.config.normalize = config.normalize
        return model
    return DualPoolingCrossEncoder.from_encoder(
        config.base, config.normalize, config.temperature, config.max_length, device, config.trust_remote_code
    )


def train_cross_encoder(
    config: TeacherTrainingConfig,
) -> tuple[DualPoolingCrossEncoder | ClassificationCrossEncoder, dict]:
    """``embeddistill train-teacher``: fine-tune a CE of ``config.architecture`` and save it to ``config.out``."""
    if not config.base or not config.datasets or not config.out:
        raise ValueError("train-teacher needs --base, --dataset and --out")
    check_teacher_training(config)  # before any model is loaded; --resume compares with the recorded settings
    device = str(resolve_device(config.device))
    seed_everything(config.seed)
    model = base_model(config, device)
    distill_teacher = None
    if config.distill_from:
        distill_teacher = CrossEncoderTeacher.load(
            config.distill_from, device, config.max_length, config.trust_remote_code
        )
    examples = collect_teacher_examples(config, device)
    trainer = CrossEncoderTrainer(model, examples, config, distill_teacher)
    record_settings(config, trainer.checkpoint_dir / "config.yaml")
    info = trainer.train()
    training = {**{k: v for k, v in asdict(config).items() if k not in ("resume",)}, **info}
    if isinstance(model, DualPoolingCrossEncoder):
        model.config.base_model, model.config.training = config.base, training
        model.save(config.out)
    else:
        model.save(config.out, {"base_model": config.base, "training": training})
    logger.info("train-teacher: saved %s (%d steps, %.0f s)", config.out, info["steps"], info["train_seconds"])
    return model, info
