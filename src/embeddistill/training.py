"""The distillation training loop: batches of queries against in-batch and mined candidates.

Each step embeds ``B`` training queries with the student, gathers the candidate documents of the batch
(every query's anchor document plus hard negatives sampled from the teacher's own top-k), scores them with
teacher and student, and minimises :class:`~embeddistill.losses.EmbedDistillLoss`. Checkpoints hold the
student's weights, the optimiser state and the RNG state, all in safetensors/JSON, so ``--resume`` continues
exactly where a run stopped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from sentence_transformers import SentenceTransformer
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from embeddistill import distributed
from embeddistill.agreement import AGREEMENT_METRIC, TeacherAgreement
from embeddistill.config import TrainingConfig
from embeddistill.data import DataError
from embeddistill.losses import EmbedDistillLoss
from embeddistill.storage import atomic_write_bytes, atomic_write_json, sha256_file
from embeddistill.students import QueryEncoder, is_asymmetric, projection_of, query_modules, trainable_parameters

logger = logging.getLogger(__name__)
CHUNK_TOKENS = 32768  # padded tokens per forward pass when a symmetric student embeds a step's documents
# cuDNN's fused attention, PyTorch's first choice in bf16 on Hopper, builds a plan on the CPU for each new input shape,
# and training meets new shapes nearly every step (chunks of documents of varying count and width): the other fused
# kernels need no plan. 3.6x the steps per second of a symmetric MiniLM student on an H100, 1.15x for a dual-pooling
# CE (benchmarks/results/speed_gpu.json, "symmetric" and "dual_pooling").
TRAINING_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def forward_context(device: torch.device, bf16: bool) -> contextlib.ExitStack:
    """A training step's forward pass: bf16 autocast if ``bf16``, attention through ``TRAINING_ATTENTION``'s kernels."""
    context = contextlib.ExitStack()
    context.enter_context(torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16))
    context.enter_context(sdpa_kernel(TRAINING_ATTENTION))
    return context


@dataclass
class TrainingQueries:
    """Training queries with everything the loss needs, aligned by row.

    ``anchors[i]`` is the document row that query ``i`` is paired with in the batch: its first labelled
    positive, the document it was generated from, or else the teacher's top document. ``negative_pool[i]``
    holds the teacher's top documents for it with labelled positives and the anchor removed (``-1`` pads).
    """

    texts: list[str]
    teacher_embeddings: np.ndarray
    anchors: np.ndarray
    positives: list[list[int]]
    negative_pool: np.ndarray
    generated: np.ndarray

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class Documents:
    texts: list[str]
    teacher_embeddings: np.ndarray


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and distributed.world_size() > 1:
        return torch.device("cuda", distributed.local_rank())  # one GPU per process: torchrun's LOCAL_RANK
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` trains under bf16 autocast where the hardware computes bf16 natively (CUDA, AVX512-BF16/AMX CPUs).

    Weights and optimiser state stay fp32; only matrix products run in bf16, about 2.5x faster on such CPUs.
    """
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16"
    return "bf16" if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


class Batcher:
    """Deterministic batches: epoch ``e`` is a permutation seeded by ``(seed, e)``, negatives by ``(seed, step)``."""

    def __init__(self, queries: TrainingQueries, batch_size: int, hard_negatives: int, seed: int):
        self.queries, self.batch_size, self.hard_negatives, self.seed = queries, batch_size, hard_negatives, seed
        self.steps_per_epoch = math.ceil(len(queries) / batch_size)
        self._order: tuple[int, np.ndarray] | None = None

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.queries)))
        return self._order[1]

    def _sample_negatives(self, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Up to ``hard_negatives`` distinct documents per row from its pool, uniformly, all rows at once."""
        pools = self.queries.negative_pool[rows]
        if not self.hard_negatives or pools.shape[1] == 0:
            return np.zeros(0, dtype=np.int64)
        # Random keys, padding last: the first k of each row's key order are a uniform sample without replacement.
        keys = np.where(pools >= 0, rng.random(pools.shape), np.inf)
        picked = np.argsort(keys, axis=1)[:, : self.hard_negatives]
        chosen = np.take_along_axis(pools, picked, axis=1)
        return chosen[chosen >= 0]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        epoch, position = divmod(step, self.steps_per_epoch)
        rows = self._epoch_order(epoch)[position * self.batch_size : (position + 1) * self.batch_size]
        rng = np.random.default_rng([self.seed, epoch, position, 1])
        candidates = np.concatenate([self.queries.anchors[rows], self._sample_negatives(rows, rng)])
        # Duplicate columns would count a document twice in the softmax: keep each document once.
        documents, inverse = np.unique(candidates.astype(np.int64), return_inverse=True)
        anchor_columns = inverse[: len(rows)]
        label_mask = np.ones((len(rows), len(documents)), dtype=bool)
        column_of: dict[int, int] | None = None
        for i, row in enumerate(rows):
            if len(self.queries.positives[row]) < 2:
                continue  # the anchor is the only positive: nothing to mask
            column_of = column_of or {int(d): c for c, d in enumerate(documents)}
            for positive in self.queries.positives[row]:
                column = column_of.get(positive)
                if column is not None and column != anchor_columns[i]:
                    label_mask[i, column] = False  # another positive of the same query is no negative
        return {"rows": rows, "documents": documents, "anchor_columns": anchor_columns, "label_mask": label_mask}


class DistillationTrainer:
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
        self.validation = validation
        self.criterion, self.config, self.out = criterion, config, Path(out)
        distributed.check_batch_size(config.batch_size)
        self.is_main = distributed.is_main()  # rank 0 alone logs, shows progress and writes checkpoints
        self.device = resolve_device(config.device)
        self.student.to(self.device)
        self.asymmetric = is_asymmetric(student)
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
        self.batcher = Batcher(queries, config.batch_size, hard_negatives, config.seed)
        self.total_steps = self.batcher.steps_per_epoch * config.epochs
        if config.max_steps:
            self.total_steps = min(self.total_steps, config.max_steps)
        self.teacher_documents = torch.from_numpy(documents.teacher_embeddings).to(self.device)
        self.teacher_queries = torch.from_numpy(queries.teacher_embeddings).to(self.device)
        self.generated = torch.from_numpy(queries.generated).to(self.device)
        self.document_tokens = DocumentTokens(documents.texts, self.encoder.tokenizer, self.encoder.max_length)
        self.checkpoint_dir = self.out / "checkpoint"
        self.log_path = self.out / "train_log.jsonl"
        self.history: list[dict] = []  # label-free checks, in step order
        self.best: tuple[dict, dict[str, torch.Tensor]] | None = None

    def schedule(self, step: int) -> float:
        """The fraction of each group's peak learning rate at ``step``: linear warm-up, then linear decay to 0."""
        warmup = max(1, int(self.config.warmup_ratio * self.total_steps))
        if step < warmup:
            return (step + 1) / warmup
        remaining = max(1, self.total_steps - warmup)
        return max(0.0, (self.total_steps - step) / remaining)

    def learning_rate(self, step: int) -> float:
        """The encoder's learning rate at ``step`` (what the log records)."""
        return self.optimizer.param_groups[0]["peak_lr"] * self.schedule(step)

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
        return self._optimise(parts, step)

    def _optimise(self, parts: dict[str, torch.Tensor], step: int) -> dict[str, float]:
        """One optimiser step on ``parts["loss"]`` at this step's learning rate; the parts as floats, to log."""
        for group in self.optimizer.param_groups:
            group["lr"] = group["peak_lr"] * self.schedule(step)
        self.optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        if self.config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.parameters, self.config.max_grad_norm)
        self.optimizer.step()
        return {name: float(value.detach()) for name, value in parts.items()}

    _WEIGHT_OF_PART = {
        "score": "score",
        "query_em": "query_embedding",
        "document_em": "document_embedding",
        "label": "label",
        "margin_mse": "margin_mse",
    }

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
        factor = {"score": share, "query_em": share, "margin_mse": share, "label": label_share, "document_em": 1.0}
        scaled = {name: value * factor[name] for name, value in parts.items() if name != "loss"}
        weights = self.criterion.weights
        loss = sum(getattr(weights, self._WEIGHT_OF_PART[name]) * value for name, value in scaled.items())
        return {"loss": loss, **scaled}

    def train(self) -> dict:
        torch.manual_seed(self.config.seed)
        start_step = self._resume() if self.config.resume else 0
        distributed.agree(start_step, "the step to resume from")
        if not self.config.resume and self.is_main:
            self.log_path.unlink(missing_ok=True)
        query_modules(self.student).train()
        started = time.perf_counter()
        running: dict[str, float] = {}
        bar = tqdm(
            range(start_step, self.total_steps),
            desc="distill",
            unit="step",
            initial=start_step,
            total=self.total_steps,
            disable=not self.is_main,
        )
        if start_step == 0:
            self._validate(0)
        for step in bar:
            parts = self.step(step)
            running = {k: 0.9 * running.get(k, v) + 0.1 * v for k, v in parts.items()}
            if self._validation_due(step + 1):
                self._validate(step + 1)
            shown = {k: f"{v:.4f}" for k, v in running.items()}
            if self.best is not None:
                shown["agree"] = f"{self.history[-1][AGREEMENT_METRIC]:.4f}"
            bar.set_postfix(shown, refresh=False)
            if step % 10 == 0 or step == self.total_steps - 1:
                parts = distributed.mean_over_ranks(parts, self.device)  # the global batch's values (all ranks join)
                self._log(
                    {
                        "step": step,
                        "epoch": step // self.batcher.steps_per_epoch,
                        "lr": self.learning_rate(step),
                        **parts,
                    }
                )
            done = step + 1
            every = self.config.checkpoint_every
            if self.is_main and every and done % every == 0 and done < self.total_steps:
                self.save_checkpoint(done)
        query_modules(self.student).eval()
        seconds = time.perf_counter() - started
        if self.is_main:
            self.save_checkpoint(self.total_steps)
        return {
            "steps": self.total_steps,
            "resumed_from_step": start_step,
            "train_seconds": seconds,
            "precision": self.precision,
            "world_size": distributed.world_size(),
            "learning_rates": {group["name"]: group["peak_lr"] for group in self.optimizer.param_groups},
            **self._finish_validation(),
        }

    # -- label-free validation: teacher agreement on held-out training queries --------------------------------

    def _validation_due(self, done: int) -> bool:
        if self.validation is None or not self.is_main:
            return False
        every = self.config.validate_every or max(1, math.ceil(self.total_steps / 8))
        return done % every == 0 or done == self.total_steps

    def _validate(self, done: int) -> None:
        """Score the student against the teacher; keep a copy of the weights when they are the best so far."""
        if self.validation is None or not self.is_main:
            return
        scores = self.validation.score(self.student)
        self.history.append({"step": done, **scores})
        self._log({"step": done, "validation": scores})
        if self.best is None or scores[AGREEMENT_METRIC] > self.best[0][AGREEMENT_METRIC]:
            state = {k: v.detach().cpu().clone() for k, v in query_modules(self.student).state_dict().items()}
            self.best = ({"step": done, **scores}, state)
        logger.info("step %d: label-free check %s", done, {k: round(v, 4) for k, v in scores.items()})

    def _finish_validation(self) -> dict:
        """Restore the best checked weights (``keep_best``); the validation record for the run summary."""
        if self.best is None:
            return {}
        best, state = self.best
        kept = self.config.keep_best and best["step"] != self.history[-1]["step"]
        if kept:
            query_modules(self.student).load_state_dict(state)
            logger.info("kept the weights of step %d (best label-free agreement)", best["step"])
        return {
            "validation": {
                "metric": AGREEMENT_METRIC,
                "queries": len(self.validation.texts),
                "start": self.history[0] if self.history[0]["step"] == 0 else None,
                "final": self.history[-1],
                "best": best,
                "kept_step": best["step"] if self.config.keep_best else self.history[-1]["step"],
                "history": self.history,
            }
        }

    def _log(self, record: dict) -> None:
        if not self.is_main:
            return
        with open(self.log_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    # -- checkpoints: safetensors + JSON, never pickle ---------------------------------------------------------

    def save_checkpoint(self, step: int) -> None:
        write_checkpoint(self.checkpoint_dir, step, query_modules(self.student), self.optimizer)
        logger.info("checkpoint at step %d -> %s", step, self.checkpoint_dir)

    def _resume(self) -> int:
        step = restore_checkpoint(self.checkpoint_dir, query_modules(self.student), self.optimizer, self.device)
        if step:
            self._truncate_log(step)
            logger.info("resumed from step %d", step)
        return step

    def _truncate_log(self, step: int) -> None:
        """Drop log records past the checkpoint: those steps are about to be run again."""
        if not self.is_main or not self.log_path.exists():
            return
        kept = [line for line in self.log_path.read_text().splitlines() if line.strip() and _log_step(line) < step]
        atomic_write_bytes(self.log_path, ("\n".join(kept) + "\n" if kept else "").encode())


def parameter_groups(student: SentenceTransformer, parameters: list, config: TrainingConfig) -> list[dict]:
    """AdamW groups: the encoder at ``learning_rate``, the student->teacher projection at its own rate.

    A pretrained encoder already sits near a good solution and loses it at a head's learning rate (every recipe
    for pretrained bodies uses 1e-4 or less), while a freshly fitted projection needs a larger one.
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


class DocumentTokens:
    """Token ids of a corpus' documents, each tokenized once, on first use.

    Symmetric students embed the same candidate documents every epoch; tokenizing a batch's ~600 texts again each
    step is CPU time the GPU waits for (0.11 s for 576 MS MARCO passages: ``benchmarks/symmetric_documents.py``).
    """

    def __init__(self, texts: list[str], tokenizer, max_length: int):
        self.texts, self.tokenizer, self.max_length = texts, tokenizer, max_length
        self._ids: dict[int, np.ndarray] = {}

    def of(self, rows) -> list[np.ndarray]:
        rows = [int(r) for r in rows]
        missing = [r for r in dict.fromkeys(rows) if r not in self._ids]
        if missing:
            encoded = self.tokenizer([self.texts[r] for r in missing], truncation=True, max_length=self.max_length)
            ids_of = zip(missing, encoded["input_ids"], strict=True)
            self._ids.update((r, np.asarray(ids, dtype=np.int32)) for r, ids in ids_of)
        return [self._ids[r] for r in rows]


def pad_token_ids(token_ids: list[np.ndarray], tokenizer) -> dict[str, torch.Tensor]:
    """The features ``tokenizer(texts, padding=True)`` gives for texts already tokenized into ``token_ids``."""
    if tokenizer.pad_token_id is None:
        raise ValueError(f"the student's tokenizer ({type(tokenizer).__name__}) has no padding token to batch with")
    width = max(len(ids) for ids in token_ids)
    input_ids = np.full((len(token_ids), width), tokenizer.pad_token_id, dtype=np.int64)
    attention_mask = np.zeros((len(token_ids), width), dtype=np.int64)
    for row, ids in enumerate(token_ids):
        span = slice(width - len(ids), width) if tokenizer.padding_side == "left" else slice(0, len(ids))
        input_ids[row, span], attention_mask[row, span] = ids, 1
    features = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask)}
    if "token_type_ids" in tokenizer.model_input_names:  # one text per row: segment 0 throughout, padding too
        features["token_type_ids"] = torch.zeros_like(features["input_ids"])
    return features


def length_chunks(sorted_lengths: list[int], chunk_tokens: int) -> list[slice]:
    """Consecutive spans of ascending ``sorted_lengths``, each at most ``chunk_tokens`` padded (or one text).

    Not ``encoding.batch_bounds``, which fixes a batch's row count from its longest text: a span here grows while its
    real padded size fits, which pads a step's mixed-length passages less.
    """
    chunks, start = [], 0
    while start < len(sorted_lengths):
        stop = start + 1  # lengths ascend, so a span's padded size is its count times its last length
        while stop < len(sorted_lengths) and (stop + 1 - start) * sorted_lengths[stop] <= chunk_tokens:
            stop += 1
        chunks.append(slice(start, stop))
        start = stop
    return chunks


def embed_by_length(
    tower: torch.nn.Module,
    token_ids: list[np.ndarray],
    tokenizer,
    device: torch.device,
    chunk_tokens: int = CHUNK_TOKENS,
) -> torch.Tensor:
    """``tower``'s fp32 embeddings of tokenized texts (in their order), run in chunks of similar length.

    Padding a whole candidate set to its longest text wastes most of the work where lengths vary (MS MARCO
    passages: 20 to 256 tokens); sorted chunks pad each text only to its neighbours' length. A chunk holds up to
    ``chunk_tokens`` tokens with padding: few chunks, since each forward pass costs CPU time to launch. The
    embeddings and their gradients are the same, since padding is masked out.
    """
    lengths = np.array([len(ids) for ids in token_ids])
    order = np.argsort(lengths, kind="stable")
    parts = []
    for chunk in length_chunks(lengths[order].tolist(), chunk_tokens):
        features = pad_token_ids([token_ids[i] for i in order[chunk]], tokenizer)
        parts.append(tower({k: v.to(device) for k, v in features.items()})["sentence_embedding"])
    restore = torch.from_numpy(np.argsort(order)).to(device)
    return torch.cat(parts).float()[restore]


def _log_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError):
        return 1 << 62  # a torn last line from a kill is dropped


def write_checkpoint(folder: Path, step: int, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Write a resumable checkpoint (safetensors + JSON, never pickle): ``module``'s weights, the optimizer and
    RNG state. ``restore_checkpoint`` reads it back."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    optimizer_tensors, optimizer_meta = _flatten_optimizer(optimizer)
    # The files of each checkpoint are named by its step, so writing a new checkpoint never touches the files
    # that the current state.json names: a kill at any moment leaves the previous checkpoint whole.
    files = {
        f"weights-{step:08d}.safetensors": weights,
        f"optimizer-{step:08d}.safetensors": optimizer_tensors,
        f"rng-{step:08d}.safetensors": {"torch": torch.get_rng_state()},
    }
    checksums = {}
    for name, tensors in files.items():
        tmp = folder / f".{name}.tmp"
        save_file(tensors, str(tmp))
        atomic_write_bytes(folder / name, tmp.read_bytes())
        tmp.unlink()
        checksums[name] = sha256_file(folder / name)
    # state.json is written last and names the files and checksums: a checkpoint is valid only when all match.
    state = {"step": step, "optimizer": optimizer_meta, "files": list(files), "sha256": checksums}
    atomic_write_json(folder / "state.json", state)
    for stale in [*folder.glob("*.safetensors"), *folder.glob(".*.tmp")]:
        if stale.name not in files:  # older checkpoints and leftovers of a killed save
            stale.unlink(missing_ok=True)


def restore_checkpoint(checkpoint_dir: Path, module: torch.nn.Module, optimizer, device: torch.device) -> int:
    """Load the checkpoint written by ``write_checkpoint`` into ``module``, ``optimizer`` and torch's RNG; return its
    step (0, with a warning, where there is none). Every file is checked against the checksums in ``state.json``
    first: a corrupt checkpoint is refused, naming the file, rather than half loaded."""
    state_path = checkpoint_dir / "state.json"
    if not state_path.exists():
        logger.warning("--resume: no checkpoint in %s, starting from scratch", checkpoint_dir)
        return 0
    try:
        state = json.loads(state_path.read_text())
        names = state.get("files") or ["weights.safetensors", "optimizer.safetensors", "rng.safetensors"]
        weights_name, optimizer_name, rng_name = names
        step, checksums = int(state["step"]), dict(state["sha256"])
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise DataError(state_path, None, f"unreadable checkpoint state ({error!r})") from None
    for name in names:
        path = checkpoint_dir / name
        if not path.is_file() or sha256_file(path) != checksums.get(name):
            problem = "checksum mismatch" if path.is_file() else "missing"
            raise DataError(path, None, f"{problem}: the checkpoint is corrupt; rerun without --resume")
    module.load_state_dict(load_file(str(checkpoint_dir / weights_name), device=str(device)))
    _restore_optimizer(optimizer, load_file(str(checkpoint_dir / optimizer_name)), state["optimizer"])
    torch.set_rng_state(load_file(str(checkpoint_dir / rng_name))["torch"])
    return step


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors = {}
    scalars: dict[str, dict] = {}
    for param_id, param_state in state["state"].items():
        for key, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"{param_id}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(param_id), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        param_id, key = name.split(".", 1)
        state.setdefault(int(param_id), {})[key] = value
    for param_id, values in meta.get("scalars", {}).items():
        state.setdefault(int(param_id), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# -- cross-encoder teachers ----------------------------------------------------------------------------------------


@dataclass
class CandidateScores:
    """A cross-encoder's scores over every training query's fixed candidate list (computed once, cached).

    ``candidates[i]`` holds document rows: column 0 is query ``i``'s anchor, columns ``1..pool_size`` its
    first-stage pool (hard negatives, labelled positives excluded), the rest random documents (the easy negatives
    that in-batch documents would be). ``scores[i, c]`` is the CE score of ``(query i, candidates[i, c])``.
    """

    candidates: np.ndarray
    scores: np.ndarray
    pool_size: int

    def __post_init__(self):
        if self.candidates.shape != self.scores.shape:
            raise ValueError(f"candidates {self.candidates.shape} and scores {self.scores.shape} differ in shape")
        if (self.candidates < 0).any():
            raise ValueError("every candidate list must be full (no -1 padding)")


class CandidateBatcher(Batcher):
    """Batches for CE distillation: each query is scored against its own candidates, whose CE scores are known.

    Epoch order and seeding as :class:`Batcher`. Each step, a query's list is its anchor, ``hard_negatives``
    candidates drawn uniformly from its first-stage pool, and all its random candidates, so every row has the same
    number ``K`` of columns and no candidate appears twice in a row.
    """

    def __init__(
        self, queries: TrainingQueries, targets: CandidateScores, batch_size: int, hard_negatives: int, seed: int
    ):
        super().__init__(queries, batch_size, hard_negatives, seed)
        self.targets = targets

    def batch(self, step: int) -> dict[str, np.ndarray]:
        epoch, position = divmod(step, self.steps_per_epoch)
        rows = self._epoch_order(epoch)[position * self.batch_size : (position + 1) * self.batch_size]
        rng = np.random.default_rng([self.seed, epoch, position, 2])
        pool = self.targets.pool_size
        width = self.targets.candidates.shape[1]
        take = min(self.hard_negatives, pool)
        picked = 1 + np.argsort(rng.random((len(rows), pool)), axis=1)[:, :take]
        fixed = np.broadcast_to(np.arange(1 + pool, width), (len(rows), width - 1 - pool))
        columns = np.concatenate([np.zeros((len(rows), 1), dtype=np.int64), picked, fixed], axis=1)
        candidates = np.take_along_axis(self.targets.candidates[rows], columns, axis=1)
        documents, inverse = np.unique(candidates, return_inverse=True)
        return {
            "rows": rows,
            "columns": columns,
            "documents": documents,
            "document_columns": inverse.reshape(candidates.shape),
        }


class CrossEncoderDistillationTrainer(DistillationTrainer):
    """Distils a cross-encoder into a symmetric dual-encoder student (METHOD.md 4).

    Per step, ``B`` queries and the ``M`` distinct documents of their candidate lists are embedded by the student;
    row ``i``'s scores are ``s_ik = <E_s(q_i), E_s(d_ik)>`` over its own ``K`` candidates and the teacher's
    ``t_ik`` are the cached CE scores. :class:`~embeddistill.losses.EmbedDistillLoss` then applies unchanged:
    score distillation (softmax over each query's candidates), Margin-MSE against the anchor (column 0), query EM
    against ``queries.teacher_embeddings`` and document EM against ``documents.teacher_embeddings`` (the
    dual-pooled CE embeddings chosen as targets, see :mod:`embeddistill.ce_pipeline`), and the label loss on the
    anchor of labelled queries. Checkpoints and ``--resume`` work as for :class:`DistillationTrainer`. One process
    only (no torchrun).
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
        self.batcher = CandidateBatcher(queries, targets, config.batch_size, hard_negatives, config.seed)
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
        return self._optimise(parts, step)
