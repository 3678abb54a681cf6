"""Label-free validation during training: the teacher-agreement check on a schedule, and the best weights kept.

The check itself (:class:`~embeddistill.evaluation.agreement.TeacherAgreement`) reads no label. It runs before the
first step, so that the student as it starts competes too: a pretrained student that training only makes worse
ends where it began. With ``keep_best`` the run ends with the best-checked weights.
"""

from __future__ import annotations

import logging
import math

import torch

from embeddistill.evaluation.agreement import AGREEMENT_METRIC, TeacherAgreement
from embeddistill.models.students import query_modules

logger = logging.getLogger(__name__)
CHECKS_PER_RUN = 8  # when validate_every is 0


class LabelFreeValidation:
    """Call with the number of steps done (``TrainingLoop``'s ``check``); :meth:`finish` once training ends."""

    def __init__(self, agreement: TeacherAgreement, student, total_steps: int, every: int, keep_best: bool):
        self.agreement, self.student, self.total_steps = agreement, student, total_steps
        self.every = every or max(1, math.ceil(total_steps / CHECKS_PER_RUN))
        self.keep_best = keep_best
        self.history: list[dict] = []
        self.best: dict | None = None
        self.best_state: dict[str, torch.Tensor] | None = None

    def __call__(self, done: int) -> dict[str, float] | None:
        if done % self.every and done != self.total_steps:
            return None
        scores = self.agreement.score(self.student)
        self.history.append({"step": done, **scores})
        if self.best is None or scores[AGREEMENT_METRIC] > self.best[AGREEMENT_METRIC]:
            self.best = {"step": done, **scores}
            tower = query_modules(self.student)
            self.best_state = {k: v.detach().cpu().clone() for k, v in tower.state_dict().items()}
        logger.info("step %d: label-free check %s", done, {k: round(v, 4) for k, v in scores.items()})
        return scores

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """What a checkpoint keeps of the check: the best weights so far, the history and the best scores."""
        return dict(self.best_state or {}), {"history": self.history, "best": self.best}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.history, self.best = list(meta["history"]), meta["best"]
        self.best_state = dict(tensors) if tensors else None

    def finish(self) -> dict:
        """Restore the best-checked weights (``keep_best``); the record that goes into the run summary."""
        if not self.history:
            return {}
        final = self.history[-1]
        kept = self.best if self.keep_best else final
        if kept["step"] != final["step"]:
            query_modules(self.student).load_state_dict(self.best_state)
            logger.info("kept the weights of step %d (best label-free agreement)", kept["step"])
        start = self.history[0] if self.history[0]["step"] == 0 else None
        return {
            "metric": AGREEMENT_METRIC,
            "queries": len(self.agreement.texts),
            "start": start,
            "final": final,
            "best": self.best,
            "kept_step": kept["step"],
            "history": self.history,
        }
