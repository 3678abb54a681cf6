"""The one training loop under every trainer: schedule, optimiser step, logging, checkpoints and ``--resume``.

A trainer (:class:`~embeddistill.training.distillation.DistillationTrainer`, its cross-encoder variant and
:class:`~embeddistill.training.teacher_finetuning.CrossEncoderTrainer`) only says what one step computes: it hands
its loss parts to :meth:`TrainingLoop.optimise` and its step function to :meth:`TrainingLoop.run`. Everything a run
must do the same way whatever it trains lives here, once:

* the learning rate: linear warm-up over ``warmup_ratio`` of the steps, then linear decay to zero;
* the optimiser step: zero the gradients, backpropagate, clip the gradient norm, step;
* a progress bar with the loss parts smoothed over about ten steps;
* ``train_log.jsonl``: one record every 10 steps and at the last step (the mean over ranks under torchrun);
* checkpoints (safetensors + JSON, never pickle) every ``checkpoint_every`` steps; ``--resume`` restores the
  weights, the optimiser and the RNG, and drops the log records of steps that are about to run again;
* Ctrl-C (SIGINT) or SIGTERM: the step under way finishes, a checkpoint of it is written and
  :class:`TrainingInterrupted` is raised (a second Ctrl-C stops at once); resuming then ends exactly as an
  uninterrupted run would.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from embeddistill.data import DataError
from embeddistill.storage import atomic_write_bytes, atomic_write_json, sha256_file
from embeddistill.training import distributed

logger = logging.getLogger(__name__)

LOG_EVERY = 10  # steps between train_log.jsonl records (the last step is always logged)


def warmup_linear(step: int, total_steps: int, warmup_ratio: float, peak: float) -> float:
    """The learning rate of ``step``: linear warm-up to ``peak`` over ``warmup_ratio`` of the run, then linear decay.

    The warm-up lasts at least one step, so the first step never runs at the full rate on fresh optimiser moments.
    """
    warmup = max(1, int(warmup_ratio * total_steps))
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * max(0.0, (total_steps - step) / max(1, total_steps - warmup))


@dataclass(frozen=True)
class LoopSettings:
    """What the loop needs of a trainer's configuration (both config classes have these fields)."""

    total_steps: int
    learning_rate: float
    warmup_ratio: float
    max_grad_norm: float
    checkpoint_every: int
    seed: int
    resume: bool

    @classmethod
    def of(cls, config, total_steps: int) -> LoopSettings:
        """The settings of a ``TrainingConfig`` or ``TeacherTrainingConfig`` for a run of ``total_steps``."""
        return cls(
            total_steps=total_steps,
            learning_rate=config.learning_rate,
            warmup_ratio=config.warmup_ratio,
            max_grad_norm=config.max_grad_norm,
            checkpoint_every=config.checkpoint_every,
            seed=config.seed,
            resume=config.resume,
        )


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped at a signal (SIGINT, SIGTERM) after step ``step``, whose checkpoint is in ``checkpoint``."""

    def __init__(self, signal_name: str, step: int, total: int, checkpoint: Path):
        super().__init__(f"{signal_name} after step {step} of {total}; checkpoint in {checkpoint}")
        self.signal_name, self.step, self.total, self.checkpoint = signal_name, step, total, checkpoint


class StopSignals:
    """While active, SIGINT and SIGTERM only ask training to stop after the step under way (a second one stops at
    once). Installed only in the main thread (elsewhere Python cannot); under torchrun the ranks stop together."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, device: torch.device):
        self.device, self.name, self.previous = device, "", {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self.previous = {number: signal.signal(number, self._handle) for number in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous = {}

    def _handle(self, number: int, frame) -> None:
        if self.name:  # asked twice: stop now, without a checkpoint of the step under way
            self.__exit__()
            raise KeyboardInterrupt
        self.name = signal.Signals(number).name
        logger.warning("%s: stopping after this step and writing a checkpoint (again: stop at once)", self.name)

    def requested(self) -> bool:
        """Whether a signal asked to stop (on any rank: every rank must stop after the same step)."""
        if distributed.world_size() == 1:
            return bool(self.name)
        asked = distributed.mean_over_ranks({"stop": float(bool(self.name))}, self.device)["stop"] > 0
        self.name = self.name or ("SIGTERM" if asked else "")
        return asked


StepFunction = Callable[[int], dict[str, float]]
Check = Callable[[int], "dict[str, float] | None"]  # steps done -> scores to log, or None when no check is due


class TrainingLoop:
    """Runs ``step(0..total_steps-1)`` of one trainer with its optimiser, log file and checkpoint folder.

    ``module`` is what a checkpoint holds and what is put in train mode (a student's query tower, a whole
    cross-encoder). ``name`` labels the progress bar; ``log_prefix`` starts each log message. Under torchrun every
    rank runs the loop, ``is_main`` alone writes the log and checkpoints. ``final_checkpoint`` also saves the last
    step, which a distillation run keeps next to its student.
    """

    def __init__(
        self,
        settings: LoopSettings,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        parameters: list[torch.nn.Parameter],
        checkpoint_dir: Path,
        log_path: Path,
        device: torch.device,
        name: str,
        log_prefix: str = "",
        is_main: bool = True,
        final_checkpoint: bool = True,
    ):
        self.settings, self.module, self.optimizer, self.parameters = settings, module, optimizer, parameters
        self.checkpoint_dir, self.log_path, self.device = Path(checkpoint_dir), Path(log_path), device
        self.name, self.log_prefix, self.is_main, self.final_checkpoint = name, log_prefix, is_main, final_checkpoint

    def learning_rate(self, step: int, peak: float | None = None) -> float:
        """The rate of ``step`` for a group whose peak is ``peak`` (default: the run's ``learning_rate``)."""
        settings = self.settings
        peak = settings.learning_rate if peak is None else peak
        return warmup_linear(step, settings.total_steps, settings.warmup_ratio, peak)

    def optimise(self, parts: dict[str, torch.Tensor], step: int) -> dict[str, float]:
        """One optimiser step on ``parts["loss"]`` at this step's learning rate; the parts as floats, to log.

        A parameter group with its own ``peak_lr`` (a student's projection, say) follows the same schedule to it.
        """
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(step, group.get("peak_lr"))
        self.optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        if self.settings.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.parameters, self.settings.max_grad_norm)
        self.optimizer.step()
        return {name: float(value.detach()) for name, value in parts.items()}

    def run(self, step: StepFunction, record: Callable[[int], dict] | None = None, check: Check | None = None) -> dict:
        """Train from step 0 (or the checkpoint, with ``resume``) to the end; return steps and timing.

        ``record(step)`` adds fields to each log record, between ``step`` and ``lr`` (e.g. the epoch).
        ``check(done)`` runs before the first step of a fresh run and after every step; where it returns scores
        (it decides when), they are logged as ``{"step": done, "validation": scores}`` and shown in the bar.
        """
        torch.manual_seed(self.settings.seed)
        self.check = check
        start = self.resume() if self.settings.resume else 0
        distributed.agree(start, "the step to resume from")
        if not self.settings.resume and self.is_main:
            self.log_path.unlink(missing_ok=True)
        self.module.train()
        started = time.perf_counter()
        self.shown: dict[str, str] = {}
        if check is not None and start == 0:
            self._check(check, 0)
        self._steps(step, start, record or (lambda _: {}), check)
        self.module.eval()
        seconds = time.perf_counter() - started
        if self.final_checkpoint and self.is_main:
            self.save_checkpoint(self.settings.total_steps)
        return {"steps": self.settings.total_steps, "resumed_from_step": start, "train_seconds": seconds}

    def _check(self, check: Check, done: int) -> None:
        scores = check(done)
        if scores:
            self._log({"step": done, "validation": scores})
            name, value = next(iter(scores.items()))
            self.shown = {name.split("_")[0]: f"{value:.4f}"}  # "agreement": the bar stays one line

    def _steps(self, step: StepFunction, start: int, record: Callable[[int], dict], check: Check | None) -> None:
        total, every = self.settings.total_steps, self.settings.checkpoint_every
        running: dict[str, float] = {}
        quiet = {} if self.is_main else {"disable": True}  # on rank 0, $TQDM_DISABLE (embeddistill -q) decides
        bar = tqdm(range(start, total), desc=self.name, unit="step", initial=start, total=total, **quiet)
        with StopSignals(self.device) as stop:
            for number in bar:
                parts = step(number)
                running = {k: 0.9 * running.get(k, v) + 0.1 * v for k, v in parts.items()}
                if check is not None:
                    self._check(check, number + 1)
                bar.set_postfix({**{k: f"{v:.4f}" for k, v in running.items()}, **self.shown}, refresh=False)
                if number % LOG_EVERY == 0 or number == total - 1:
                    parts = distributed.mean_over_ranks(parts, self.device)  # the global batch's (all ranks join)
                    self._log({"step": number, **record(number), "lr": self.learning_rate(number), **parts})
                done = number + 1
                saved = self.is_main and every and done % every == 0 and done < total
                if saved:
                    self.save_checkpoint(done)
                if done < total and stop.requested():
                    bar.close()
                    self._stop(stop.name, done, already_saved=bool(saved))

    def _stop(self, signal_name: str, done: int, already_saved: bool) -> None:
        """Write the checkpoint of step ``done`` (where the schedule did not just write it) and stop."""
        if self.is_main and not already_saved:
            self.save_checkpoint(done)
        total = self.settings.total_steps
        logger.warning("%sstopped by %s after step %d of %d", self.log_prefix, signal_name, done, total)
        raise TrainingInterrupted(signal_name, done, total, self.checkpoint_dir)

    def _log(self, entry: dict) -> None:
        if not self.is_main:
            return
        with open(self.log_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")

    def save_checkpoint(self, step: int) -> None:
        """A checkpoint of the module, the optimiser and the RNG, plus the check's own state where it has one (the
        label-free check's history and best weights), so that a resumed run ends exactly as an unbroken one."""
        stateful = getattr(self, "check", None)
        extra = stateful.state() if hasattr(stateful, "state") else None
        write_checkpoint(self.checkpoint_dir, step, self.module, self.optimizer, extra)
        logger.info("%scheckpoint at step %d -> %s", self.log_prefix, step, self.checkpoint_dir)

    def resume(self) -> int:
        """Restore the checkpoint (if any) and return its step; log records past it are dropped."""
        step = restore_checkpoint(self.checkpoint_dir, self.module, self.optimizer, self.device)
        stateful = getattr(self, "check", None)
        if step and hasattr(stateful, "load_state"):
            extra = restore_extra(self.checkpoint_dir)
            if extra is not None:
                stateful.load_state(*extra)
        if step:
            self._truncate_log(step)
            logger.info("%sresumed from step %d", self.log_prefix, step)
        return step

    def _truncate_log(self, step: int) -> None:
        """Drop log records past the checkpoint: those steps are about to be run again. The check made at the
        checkpoint's own step ran before it was saved, so its record stays."""
        if not self.is_main or not self.log_path.exists():
            return
        kept = [line for line in self.log_path.read_text().splitlines() if line.strip() and _before(line, step)]
        atomic_write_bytes(self.log_path, ("\n".join(kept) + "\n" if kept else "").encode())


def _before(line: str, step: int) -> bool:
    number = _log_step(line)
    return number < step or (number == step and '"validation"' in line)


def _log_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError):
        return 1 << 62  # a torn last line from a kill is dropped


# -- checkpoints: safetensors + JSON, never pickle ---------------------------------------------------------------


def write_checkpoint(
    folder: Path,
    step: int,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: tuple[dict[str, torch.Tensor], dict] | None = None,
) -> None:
    """Write a resumable checkpoint (safetensors + JSON, never pickle): ``module``'s weights, the optimizer and
    RNG state, and ``extra`` (tensors, JSON) where given. ``restore_checkpoint`` / ``restore_extra`` read it back."""
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
    extra_file = f"extra-{step:08d}.safetensors" if extra is not None else None
    if extra is not None:
        files[extra_file] = {k: v.detach().cpu().contiguous() for k, v in extra[0].items()}
    checksums = {}
    for name, tensors in files.items():
        tmp = folder / f".{name}.tmp"
        save_file(tensors, str(tmp))
        atomic_write_bytes(folder / name, tmp.read_bytes())
        tmp.unlink()
        checksums[name] = sha256_file(folder / name)
    # state.json is written last and names the files and checksums: a checkpoint is valid only when all match.
    names = [name for name in files if name != extra_file]
    state = {"step": step, "optimizer": optimizer_meta, "files": names, "sha256": checksums}
    if extra is not None:
        state["extra"] = {"file": extra_file, "meta": extra[1]}
    atomic_write_json(folder / "state.json", state)
    for stale in [*folder.glob("*.safetensors"), *folder.glob(".*.tmp")]:
        if stale.name not in files:  # older checkpoints and leftovers of a killed save
            stale.unlink(missing_ok=True)


def restore_extra(checkpoint_dir: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The ``extra`` (tensors, JSON) that ``write_checkpoint`` stored beside the weights, checksum checked; None
    where the checkpoint has none."""
    state, _ = _read_state(checkpoint_dir)
    extra = state.get("extra")
    if not extra:
        return None
    path = checkpoint_dir / extra["file"]
    if not path.is_file() or sha256_file(path) != state["sha256"].get(extra["file"]):
        problem = "checksum mismatch" if path.is_file() else "missing"
        raise DataError(path, None, f"{problem}: the checkpoint is corrupt; rerun without --resume")
    return load_file(str(path)), extra["meta"]


def _read_state(checkpoint_dir: Path) -> tuple[dict, list[str]]:
    """``state.json`` and the checkpoint files it names, each checked against its checksum first: a corrupt
    checkpoint is refused, naming the file, rather than half loaded."""
    state_path = checkpoint_dir / "state.json"
    try:
        state = json.loads(state_path.read_text())
        names = state.get("files") or ["weights.safetensors", "optimizer.safetensors", "rng.safetensors"]
        _weights, _optimizer, _rng = names
        int(state["step"])
        checksums = dict(state["sha256"])
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise DataError(state_path, None, f"unreadable checkpoint state ({error!r})") from None
    for name in names:
        path = checkpoint_dir / name
        if not path.is_file() or sha256_file(path) != checksums.get(name):
            problem = "checksum mismatch" if path.is_file() else "missing"
            raise DataError(path, None, f"{problem}: the checkpoint is corrupt; rerun without --resume")
    return state, names


def restore_checkpoint(checkpoint_dir: Path, module: torch.nn.Module, optimizer, device: torch.device) -> int:
    """Load the checkpoint written by ``write_checkpoint`` into ``module``, ``optimizer`` and torch's RNG; return its
    step (0, with a warning, where there is none)."""
    if not (checkpoint_dir / "state.json").exists():
        logger.warning("--resume: no checkpoint in %s, starting from scratch", checkpoint_dir)
        return 0
    state, (weights_name, optimizer_name, rng_name) = _read_state(checkpoint_dir)
    try:
        module.load_state_dict(load_file(str(checkpoint_dir / weights_name), device=str(device)))
    except RuntimeError as error:  # another architecture: missing, unexpected or differently shaped tensors
        first = str(error).splitlines()[1:2] or [str(error)[:200]]
        raise DataError(
            checkpoint_dir / weights_name, None,
            f"the checkpoint's weights do not fit this model ({first[0].strip()}); resume with the settings that "
            "made it, or start again with --overwrite",
        ) from None  # fmt: skip
    _restore_optimizer(optimizer, load_file(str(checkpoint_dir / optimizer_name)), state["optimizer"])
    torch.set_rng_state(load_file(str(checkpoint_dir / rng_name))["torch"])
    return int(state["step"])


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
