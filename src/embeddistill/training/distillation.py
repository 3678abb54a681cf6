"""The distillation trainers: a dual-encoder or cross-encoder teacher's scores and embeddings into a student.

Each step embeds ``B`` training queries with the student, gathers the candidate documents of the batch
(every query's anchor document plus hard negatives sampled from the teacher's own top-k), scores them with
teacher and student, and minimises :class:`~embeddistill.losses.EmbedDistillLoss`. The schedule, optimiser step,
log and checkpoints (so that ``--resume`` continues exactly where a run stopped) are
:class:`~embeddistill.training.loop.TrainingLoop`'s.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

from embeddistill.config import TrainingConfig
from embeddistill.evaluation.agreement import TeacherAgreement
from embeddistill.losses import EmbedDistillLoss
from embeddistill.models.students import (
    QueryEncoder,
    is_asymmetric,
    projection_of,
    query_modules,
    searches_teacher_documents,
    trainable_parameters,
)
from embeddistill.runtime import forward_context, resolve_device, resolve_precision
from embeddistill.training import distributed
from embeddistill.training.batching import (
    Batcher,
    CandidateBatcher,
    CandidateScores,
    Documents,
    DocumentTokens,
    TrainingQueries,
    embed_by_length,
    real_query_repeats,
)
from embeddistill.training.loop import LoopSettings, TrainingLoop
from embeddistill.training.validation import LabelFreeValidation


class DistillationTrainer:
    """Distils a dual-encoder teacher into a student (asymmetric: a new query tower; symmetric: one tower).

    Under torchrun each rank trains on its share of every global batch (see :mod:`embeddistill.training.distributed`).
    Writes ``train_log.jsonl`` and ``checkpoint/`` into ``out``.
    """

    def __init__(
        self,
        student: SentenceTransformer,
        queries: TrainingQueries,
        documents: Documents,
        criterion: EmbedDistillLoss,
        config: TrainingConfig,
        hard_negatives: int,
        out: Path,
        freeze_word_embeddings: bool = True,
        dropout: bool = False,
        validation: TeacherAgreement | None = None,
    ):
        self.student, self.queries, self.documents = student, queries, documents
        self.criterion, self.config, self.out = criterion, config, Path(out)
        distributed.check_batch_size(config.batch_size)
        self.is_main = distributed.is_main()  # rank 0 alone logs, shows progress and writes checkpoints
        self.device = resolve_device(config.device)
        self.student.to(self.device)
        self.asymmetric = searches_teacher_documents(student)  # an asymmetric or a black-box teacher's student
        self.precision = resolve_precision(config.precision, self.device)
        self.encoder = QueryEncoder.of(student)
        self.parameters = trainable_parameters(student, freeze_word_embeddings)
        if not dropout:
            # The target is a deterministic teacher: dropout noise only slows the fit of a small student.
            for module in query_modules(student).modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
        groups = parameter_groups(student, self.parameters, config)
        self.optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
        # Under torchrun the query tower runs wrapped in DDP (trainable parameters only); otherwise it is itself.
        example = self.encoder.tokenize(["an example query"], self.device)
        self.tower = distributed.data_parallel(query_modules(student), self.device, example)
        self.batcher = Batcher(queries, config.batch_size, hard_negatives, config.seed, repeats_of(config))
        self.total_steps = planned_steps(config, self.batcher.steps_per_epoch)
        self.teacher_documents = torch.from_numpy(documents.teacher_embeddings).to(self.device)
        self.teacher_queries = torch.from_numpy(queries.teacher_embeddings).to(self.device)
        self.generated = torch.from_numpy(queries.generated).to(self.device)
        self.document_tokens = DocumentTokens(documents.texts, self.encoder.tokenizer, self.encoder.max_length)
        if not self.asymmetric:  # every document a batch can draw: an anchor or one of the teacher's top documents
            self.document_tokens.prefill(np.concatenate([queries.anchors.ravel(), queries.negative_pool.ravel()]))
        self.checkpoint_dir = self.out / "checkpoint"
        self.log_path = self.out / "train_log.jsonl"
        self.loop = TrainingLoop(
            LoopSettings.of(config, self.total_steps),
            query_modules(student),
            self.optimizer,
            self.parameters,
            self.checkpoint_dir,
            self.log_path,
            self.device,
            name="distill",
            is_main=self.is_main,
        )
        self.validation = None
        if validation is not None and self.is_main:
            every, keep = config.validate_every, config.keep_best
            self.validation = LabelFreeValidation(validation, student, self.total_steps, every, keep)

    def learning_rate(self, step: int) -> float:
        return self.loop.learning_rate(step)

    def _forward_context(self) -> contextlib.ExitStack:
        return forward_context(self.device, self.precision == "bf16")

    def _embed_documents(self, rows: np.ndarray) -> torch.Tensor:
        """The student's fp32 embeddings of documents ``rows`` (symmetric students).

        Under torchrun each rank embeds its contiguous share of ``rows`` and the shares are all-gathered, the
        gradient flowing back to the rank that embedded each document: the candidate set is the global batch's.
        """
        start, stop = distributed.shard_bounds(len(rows))
        if stop > start:
            token_ids = self.document_tokens.of(rows[start:stop])
            local = embed_by_length(self.tower, token_ids, self.encoder.tokenizer, self.device)
        else:  # fewer candidates than ranks: this rank embeds none
            local = torch.zeros(0, self.teacher_documents.shape[1], device=self.device)
        sizes = [b - a for a, b in (distributed.shard_bounds(len(rows), r) for r in range(distributed.world_size()))]
        return distributed.gather_with_grad(local, sizes)

    def step(self, step: int) -> dict[str, float]:
        batch = self.batcher.batch(step)
        # Under torchrun this rank's loss covers its contiguous share of the batch's query rows, scored against all
        # of the batch's candidate documents, then is rescaled by _rank_share (see there for why that is exact).
        start, stop = distributed.shard_bounds(len(batch["rows"]))
        local = slice(start, stop) if stop > start else slice(0, 1)  # an empty share still runs, with weight 0
        rows, documents = batch["rows"][local], torch.from_numpy(batch["documents"]).to(self.device)
        texts = [self.queries.texts[r] for r in rows]
        index = torch.from_numpy(rows).to(self.device)
        anchor_columns = torch.from_numpy(batch["anchor_columns"][local]).to(self.device)
        with self._forward_context():
            student_queries = self.tower(self.encoder.tokenize(texts, self.device))["sentence_embedding"].float()
            teacher_queries = self.teacher_queries[index]
            # Asymmetric: the candidates are the teacher's constant document embeddings, which every rank holds, so
            # cross-device negatives cost no communication beyond DDP's gradient all-reduce.
            teacher_documents = self.teacher_documents[documents]
            student_documents = None if self.asymmetric else self._embed_documents(batch["documents"])
            scored_documents = teacher_documents if self.asymmetric else student_documents
        # Scores and loss in fp32: under bf16 autocast logits of 8-20 would be rounded to steps of 0.06-0.125 and
        # the teacher's near-ties inside its top 10 would become ties (the embeddings are fp32 already).
        with torch.autocast(self.device.type, enabled=False):
            parts = self.criterion(
                student_scores=student_queries @ scored_documents.T,
                teacher_scores=teacher_queries @ teacher_documents.T,
                student_queries=student_queries,
                teacher_queries=teacher_queries,
                anchor_index=anchor_columns,
                positive_index=anchor_columns,
                label_mask=torch.from_numpy(batch["label_mask"][local]).to(self.device),
                student_documents=student_documents,
                teacher_documents=teacher_documents,
                generated=self.generated[index],
            )
        if distributed.world_size() > 1:
            parts = self._rank_share(parts, batch["rows"], start, stop)
        return self.loop.optimise(parts, step)

    def _rank_share(self, parts: dict, rows: np.ndarray, start: int, stop: int) -> dict:
        """Rescale this rank's loss parts so that DDP's gradient average is the single-process gradient.

        Single process, a global batch of B query rows and M candidates: ``L = sum_p w_p L_p``, where score, query
        EM and Margin-MSE are means over the B rows (``L_p = (1/B) sum_i l_p(i)``; every row has M - 1 margins),
        the label loss is a mean over the N labelled (non-generated) rows and document EM a mean over the M
        candidates. Rank r of W holds rows ``[start, stop)`` (b_r of them, n_r labelled) and computes the same
        parts on them, against all M candidates: ``L_{p,r} = (1/b_r) sum_{i in r} l_p(i)``. DDP averages
        gradients, ``g = (1/W) sum_r grad L_r``, so with

            ``L_r = sum_p w_p c_{p,r} L_{p,r}``,  ``c = W b_r / B`` (row means), ``W n_r / N`` (label), ``1`` (doc EM)

        ``(1/W) sum_r c_{p,r} L_{p,r} = (1/B) sum_i l_p(i) = L_p`` for the row parts and the label part, and
        ``(1/W) sum_r L_d = L_d`` because every rank computes document EM over the same gathered M documents.
        Symmetric students' documents are gathered with ``all_gather``, whose backward *sums* all ranks'
        gradients for document j onto the rank that embedded it; summed over ranks, the local parameter
        gradients are therefore ``sum_r grad L_r`` with each ``L_r`` differentiated through all M documents, and
        DDP's ``1/W`` makes that ``grad (1/W) sum_r L_r = grad L``. (No extra factor W on the gathered part: the
        sum in all_gather's backward and DDP's mean cancel.) With B divisible by W, ``c = 1`` for row parts
        except on an epoch's last, smaller batch; a rank with no rows runs one with ``c = 0``. The gradient is
        then the global-batch gradient up to float summation order, and clipping its norm matches clipping in
        one process. The returned parts are this rank's estimates; their mean over ranks is the global value.
        """
        world = distributed.world_size()
        share = world * (stop - start) / len(rows)
        labelled = ~self.queries.generated[rows]
        total_labelled = int(labelled.sum())
        label_share = world * int(labelled[start:stop].sum()) / total_labelled if total_labelled else 0.0
        factor = {"queries": share, "labelled": label_share, "documents": 1.0}
        scaled = {
            name: value * factor[self.criterion.averaged_over(name)] for name, value in parts.items() if name != "loss"
        }
        return {"loss": self.criterion.total(scaled), **scaled}

    def train(self) -> dict:
        """Train to the end (or on from the checkpoint, with ``resume``); steps, timing, precision and ranks."""
        epoch = self.batcher.steps_per_epoch
        info = self.loop.run(self.step, lambda step: {"epoch": step // epoch}, check=self.validation)
        rates = {group["name"]: group["peak_lr"] for group in self.optimizer.param_groups}
        info = {**info, "precision": self.precision, "world_size": distributed.world_size(), "learning_rates": rates}
        if self.validation is not None:
            info["validation"] = self.validation.finish()
        return info

    def save_checkpoint(self, step: int) -> None:
        self.loop.save_checkpoint(step)


def planned_steps(config: TrainingConfig, steps_per_epoch: int) -> int:
    """The run's optimiser steps: every epoch, or ``max_steps`` where that is fewer."""
    unresolved = [name for name in ("epochs", "max_steps") if getattr(config, name) == "auto"]
    if unresolved:
        raise ValueError(f"{' and '.join(unresolved)} 'auto' must be resolved (resolve_student_recipe) before training")
    total = steps_per_epoch * config.epochs
    return min(total, config.max_steps) if config.max_steps else total


def repeats_of(config: TrainingConfig) -> int:
    """Each real query's copies in an epoch (:func:`~embeddistill.training.batching.real_query_repeats`)."""
    planned_steps(config, 1)  # refuses an unresolved 'auto' epochs, naming it
    return real_query_repeats(config.real_query_passes, config.epochs)


def parameter_groups(student: SentenceTransformer, parameters: list, config: TrainingConfig) -> list[dict]:
    """AdamW groups: the encoder at ``learning_rate``, the student->teacher projection at its own rate.

    A pretrained encoder already sits near a good solution and loses it at a head's learning rate (recipes for
    pretrained bodies use 1e-4 or less), while a freshly fitted projection needs a larger one.
    """
    if not isinstance(config.learning_rate, float):
        raise ValueError(f"learning_rate {config.learning_rate!r} must be resolved to a number before training")
    projection = projection_of(student)
    head = {id(p) for p in projection.parameters()} if projection is not None else set()
    encoder = [p for p in parameters if id(p) not in head]
    groups = [{"name": "encoder", "params": encoder, "peak_lr": config.learning_rate}]
    in_head = [p for p in parameters if id(p) in head]
    if in_head:
        rate = config.projection_learning_rate or config.learning_rate
        groups.append({"name": "projection", "params": in_head, "peak_lr": rate})
    return [{**group, "lr": group["peak_lr"]} for group in groups]


class CrossEncoderDistillationTrainer(DistillationTrainer):
    """Distils a cross-encoder into a symmetric dual-encoder student (docs/METHOD.md, section 4).

    Per step, ``B`` queries and the ``M`` distinct documents of their candidate lists are embedded by the student;
    row ``i``'s scores are ``s_ik = <E_s(q_i), E_s(d_ik)>`` over its own ``K`` candidates and the teacher's
    ``t_ik`` are the cached CE scores. :class:`~embeddistill.losses.EmbedDistillLoss` then applies unchanged:
    score distillation (softmax over each query's candidates), Margin-MSE against the anchor (column 0), query EM
    against ``queries.teacher_embeddings`` and document EM against ``documents.teacher_embeddings`` (the
    dual-pooled CE embeddings chosen as targets, see :mod:`embeddistill.pipeline.cross_encoder`), and the label loss
    on the anchor of labelled queries. Checkpoints and ``--resume`` work as for :class:`DistillationTrainer`. One
    process only (no torchrun).
    """

    def __init__(
        self,
        student: SentenceTransformer,
        queries: TrainingQueries,
        documents: Documents,
        targets: CandidateScores,
        criterion: EmbedDistillLoss,
        config: TrainingConfig,
        hard_negatives: int,
        out: Path,
        freeze_word_embeddings: bool = True,
        dropout: bool = False,
    ):
        if distributed.world_size() > 1:
            raise ValueError("distillation from a cross-encoder runs in one process (not under torchrun)")
        if is_asymmetric(student):
            raise ValueError("a cross-encoder has no document tower to keep: the student must be symmetric")
        super().__init__(
            student, queries, documents, criterion, config, hard_negatives, out, freeze_word_embeddings, dropout
        )
        repeats = repeats_of(config)
        self.batcher = CandidateBatcher(queries, targets, config.batch_size, hard_negatives, config.seed, repeats)
        self.teacher_scores = torch.from_numpy(targets.scores.astype(np.float32)).to(self.device)

    def step(self, step: int) -> dict[str, float]:
        batch = self.batcher.batch(step)
        rows = batch["rows"]
        index = torch.from_numpy(rows).to(self.device)
        columns = torch.from_numpy(batch["columns"]).to(self.device)
        document_columns = torch.from_numpy(batch["document_columns"]).to(self.device)
        zeros = torch.zeros(len(rows), dtype=torch.long, device=self.device)
        with self._forward_context():
            texts = [self.queries.texts[r] for r in rows]
            student_queries = self.tower(self.encoder.tokenize(texts, self.device))["sentence_embedding"].float()
            student_documents = self._embed_documents(batch["documents"])
        with torch.autocast(self.device.type, enabled=False):  # scores and loss in fp32 (see DistillationTrainer)
            parts = self.criterion(
                student_scores=(student_queries @ student_documents.T).gather(1, document_columns),
                teacher_scores=self.teacher_scores[index].gather(1, columns),
                student_queries=student_queries,
                teacher_queries=self.teacher_queries[index],
                anchor_index=zeros,
                positive_index=zeros,
                student_documents=student_documents,
                teacher_documents=self.teacher_documents[torch.from_numpy(batch["documents"]).to(self.device)],
                generated=self.generated[index],
            )
        return self.loop.optimise(parts, step)
