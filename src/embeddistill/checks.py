"""The one place where a run's options are checked, before any data or model is loaded.

A mistake in an option should cost a second, not an hour of teacher encoding: ``embeddistill distill`` (and the
library's :func:`embeddistill.pipeline.distill`) and ``train-teacher`` call :func:`check_distill` /
:func:`check_teacher_training` first. Each problem names the flag (which is also the YAML key) and what to do;
all of them are reported at once. Three kinds of rule:

* each field's own limits, declared on the field with :func:`embeddistill.config.option` (``minimum``,
  ``maximum``, ``above``, ``why``);
* rules between options (``teacher:N`` against the teacher's layers, read from its ``config.json`` alone; hard
  negatives against the depth they are drawn from; at least one loss term);
* the output folder: a folder that holds a checkpoint is continued (``--resume``) only with the settings that
  made it, and started again only when asked (``--overwrite``); see :func:`check_run_folder`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from embeddistill.api_options import api_problems
from embeddistill.config import DistillConfig, TeacherTrainingConfig, leaf_fields

logger = logging.getLogger(__name__)

RECOMMENDED_BATCH_SIZE = 8
_TEACHER_LAYERS = re.compile(r"^teacher:(-?\d+(?:,-?\d+)*)$")
_LAYER_KEYS = ("num_hidden_layers", "n_layers", "num_layers", "n_layer")


class OptionError(ValueError):
    """One or more options that cannot work together; the message lists each (flag, problem, what to do)."""


def flag(name: str, meta: Any = None) -> str:
    """The command-line flag of config field ``name`` (its ``flag`` metadata where it has one)."""
    return (meta or {}).get("flag") or "--" + name.replace("_", "-")


def field_problems(config: Any) -> list[str]:
    """Every value outside the limits its field declares (``minimum``, ``maximum``, ``above``)."""
    problems = []
    for name, (section, f) in leaf_fields(config).items():
        value, meta = getattr(section, name), f.metadata
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, bool) or not isinstance(item, int | float):
                continue  # strings (and 'auto') and switches have no limits
            problem = _out_of_bounds(item, meta)
            if problem:
                why = f" ({meta['why']})" if "why" in meta else ""
                problems.append(f"{flag(name, meta)} must be {problem}{why}; got {item!r}")
                break
    return problems


def _out_of_bounds(value: float, meta: dict) -> str | None:
    if "above" in meta and not value > meta["above"]:
        return f"above {meta['above']:g}"
    if "minimum" in meta and value < meta["minimum"]:
        return f"at least {meta['minimum']:g}"
    if "maximum" in meta and value > meta["maximum"]:
        return f"at most {meta['maximum']:g}"
    return None


def check_distill(config: DistillConfig) -> list[str]:
    """Refuse (:class:`OptionError`) a ``distill`` run whose options cannot work; return warnings to log.

    Reads nothing but the teacher's ``config.json`` (for ``teacher:N``) and the output folder's ``config.yaml`` and
    checkpoint state (for ``--resume`` / ``--overwrite``).
    """
    problems = field_problems(config)
    loss, training = config.loss, config.training
    if loss.hard_negatives > loss.hard_negative_depth:
        problems.append(
            f"--hard-negatives {loss.hard_negatives} cannot be drawn from the teacher's top "
            f"--hard-negative-depth {loss.hard_negative_depth}: raise the depth or lower the count"
        )
    weights = {f.name: getattr(loss, f.name) for f in dataclasses.fields(loss) if f.name.endswith("_weight")}
    if not any(weights.values()):
        problems.append(f"every loss weight is 0 ({', '.join(map(flag, weights))}): nothing would be trained")
    problems += _student_problems(config)
    problems += _baseline_problems(config)
    problems += _max_length_problems(config)
    problems += api_problems(config)  # a black-box teacher (endpoint or vectors)
    if problems:
        raise OptionError("\n  ".join(["options that cannot work:", *problems]))
    if config.out:
        check_run_folder(Path(config.out), Path(config.out) / "checkpoint", config, Path(config.out) / "config.yaml")
    warnings = []
    if training.batch_size < RECOMMENDED_BATCH_SIZE:
        warnings.append(
            f"--batch-size {training.batch_size}: each query is scored against only {training.batch_size - 1} other "
            f"queries' documents (in-batch negatives) and each step is noisy; {RECOMMENDED_BATCH_SIZE} or more is "
            "recommended (a run at batch size 1 ended worse than the untrained student)"
        )
    return warnings


def _student_problems(config: DistillConfig) -> list[str]:
    """``teacher:N`` must name 1 to the teacher's number of layers, ``teacher:0,11`` layers it has, in increasing
    order; ``--student-layers`` does the same for a named student model."""
    match = _TEACHER_LAYERS.match(config.model.student)
    layers = config.model.student_layers
    if not match:
        if not layers:
            return []
        flag = f"--student-layers {' '.join(map(str, layers))}"
        return _layer_spec_problems(layers, teacher_layers(config.model.student), config.model.student, flag, "")
    flag = f"--student {config.model.student}"
    if layers:
        return [f"--student-layers {' '.join(map(str, layers))} with {flag}: give the layers in 'teacher:...' only"]
    reference = config.model.teacher or config.ce.first_stage
    if config.ce.cross_encoder and Path(config.ce.cross_encoder).expanduser().is_dir():
        reference = config.ce.cross_encoder  # a CE run's teacher:N student copies the cross-encoder's encoder
    total = teacher_layers(reference) if reference else None
    numbers = [int(n) for n in match.group(1).split(",")]
    return _layer_spec_problems(numbers, total, reference, flag, "teacher:")


def _layer_spec_problems(numbers: list[int], total: int | None, model: str, flag: str, prefix: str) -> list[str]:
    """One number N keeps the first N layers (1 to ``total``); several name the layers to keep, once each and
    increasing, a negative one counting from the top. ``total`` is None where only loading the model tells."""
    if len(numbers) > 1:
        if total is not None and any(-total <= n < 0 for n in numbers):
            numbers = [n + total if n < 0 else n for n in numbers]  # counted from the top, as in Python
        elif total is None and any(n < 0 for n in numbers):
            return []  # a hub model: its layer count is known once it loads
        if numbers != sorted(set(numbers)) or numbers[0] < 0:
            example = f"{prefix}0,11, or {prefix}0,-1" if prefix else "0 11, or 0 -1"
            return [
                f"{flag}: name the layers to keep once each, increasing (e.g. {example} for the bottom and the top "
                "layer)"
            ]
        if total is not None and numbers[-1] >= total:
            return [f"{flag}: {model} has layers 0 to {total - 1}"]
        return []
    if numbers[0] < 1:
        return [f"{flag}: N counts the first N layers, so it is at least 1"]
    if total is not None and numbers[0] > total:
        return [f"{flag}: {model} has {total} layers; use {prefix}1 to {prefix}{total}"]
    return []


def _baseline_problems(config: DistillConfig) -> list[str]:
    """``--baselines`` entries that name a local folder (a path, not a hub id ``org/name``) which is not there."""
    problems = []
    for name in config.evaluation.baselines:
        if name in ("", "auto"):
            continue
        path = Path(name).expanduser()
        looks_local = name.startswith(("/", ".", "~")) or name.count("/") > 1 or path.exists()
        if looks_local and not path.is_dir():
            problems.append(
                f"--baselines {name}: no such folder; give a sentence-transformers model folder or a hub id "
                "(org/name), or leave it out"
            )
    return problems


def _max_length_problems(config: DistillConfig) -> list[str]:
    """``--max-seq-length`` longer than the teacher's position embeddings reach (a shape error deep in the first
    batch otherwise)."""
    wanted, teacher = config.model.max_seq_length, config.model.teacher
    values = _model_config(teacher) if wanted and teacher else None
    if not values or not isinstance(values.get("max_position_embeddings"), int):
        return []
    # RoBERTa-style models number positions after the padding index: two of their slots are never a token's.
    offset = 2 if values.get("model_type") in ("roberta", "xlm-roberta", "mpnet", "camembert") else 0
    limit = values["max_position_embeddings"] - offset
    if wanted <= limit:
        return []
    return [f"--max-seq-length {wanted}: {teacher} embeds positions up to {limit}; give at most {limit}"]


def teacher_layers(name_or_path: str) -> int | None:
    """The number of transformer layers of a model, from its ``config.json`` alone (no weights are loaded); None
    where it cannot be found without loading the model (a hub name not in the local cache, an unknown layout)."""
    values = _model_config(name_or_path) or {}
    return next((values[key] for key in _LAYER_KEYS if isinstance(values.get(key), int)), None)


def _model_config(name_or_path: str) -> dict | None:
    """The transformer's ``config.json`` of a local folder or an already downloaded hub model (nothing is
    fetched and no weights are loaded); None where there is none to read."""
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        folder = _hub_snapshot(name_or_path)
        if folder is None:
            return None
    for config_path in _transformer_configs(folder):
        try:
            values = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if any(isinstance(values.get(key), int) for key in (*_LAYER_KEYS, "max_position_embeddings")):
            return values
    return None


def _transformer_configs(folder: Path) -> list[Path]:
    """``config.json`` of a sentence-transformers model's Transformer module (per ``modules.json``), then the
    folder's own."""
    paths = []
    try:
        modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
        paths += [folder / m.get("path", "") / "config.json" for m in modules if "Transformer" in m.get("type", "")]
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    return [*paths, folder / "config.json"]


def _hub_snapshot(name: str) -> Path | None:
    """The local snapshot folder of a hub model already downloaded (nothing is fetched)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name if "/" in name else f"sentence-transformers/{name}", "config.json")
    except Exception:  # an odd name or no hub client: the check happens when the model is loaded
        return None
    return Path(found).parent if isinstance(found, str) else None


def check_teacher_training(config: TeacherTrainingConfig) -> None:
    """``train-teacher``'s options: each field's limits, then its output folder (``OUT.checkpoint/``)."""
    problems = field_problems(config)
    if problems:
        raise OptionError("\n  ".join(["options that cannot work:", *problems]))
    if config.out:
        out = Path(config.out)
        checkpoint = out.parent / f"{out.name}.checkpoint"
        check_run_folder(out, checkpoint, config, checkpoint / "config.yaml")


# -- the output folder: --resume and --overwrite ------------------------------------------------------------------


def check_run_folder(out: Path, checkpoint: Path, config: Any, recorded: Path) -> None:
    """A folder whose ``checkpoint`` holds an earlier run is never silently started again.

    Without ``--resume`` or ``--overwrite`` that is an error naming both; with ``--overwrite`` the checkpoint is
    deleted here (nothing else of the folder: the outputs are replaced as the new run writes them); with
    ``--resume`` the settings that shape training must equal those the checkpoint was made with (``recorded``, the
    run's ``config.yaml``), or the run is refused with the differences listed.
    """
    training = getattr(config, "training", config)
    if training.resume and training.overwrite:
        raise OptionError("--resume and --overwrite contradict each other: continue the run, or start it again")
    state = checkpoint / "state.json"
    if not state.exists():
        return
    if training.overwrite:
        logger.warning("--overwrite: deleting the checkpoint of an earlier run in %s", checkpoint)
        shutil.rmtree(checkpoint, ignore_errors=True)  # under torchrun every rank gets here
        return
    if not training.resume:
        raise OptionError(
            f"{out} holds a checkpoint of an earlier run ({_step_of(state)}): add --resume to continue it, or "
            "--overwrite to start again and delete it (or choose another --out)"
        )
    differences = settings_differences(recorded, config)
    if differences:
        raise OptionError(
            "\n  ".join(
                [
                    f"--resume: {checkpoint} was made with other settings; resuming would mix two runs:",
                    *differences,
                    "resume with the checkpoint's settings, or start again with --overwrite (or another --out)",
                ]
            )
        )


def _step_of(state: Path) -> str:
    try:
        return f"step {int(json.loads(state.read_text())['step'])}"
    except (OSError, ValueError, KeyError, TypeError):
        return "an unreadable state.json"


def shaping_settings(config: Any) -> dict[str, Any]:
    """The settings that shape training's result: every field not marked ``shapes=False``."""
    return {
        name: getattr(section, name)
        for name, (section, f) in leaf_fields(config).items()
        if f.metadata.get("shapes", True)
    }


def settings_differences(recorded: Path, config: Any) -> list[str]:
    """``--flag: checkpoint X, now Y`` for every shaping setting that differs from the run that made ``recorded``."""
    if not recorded.is_file():
        logger.warning("--resume: %s is missing, so the settings cannot be compared with the checkpoint's", recorded)
        return []
    kind = type(config)
    try:
        earlier = kind.from_yaml(recorded) if hasattr(kind, "from_yaml") else _from_yaml(kind, recorded)
    except ValueError as error:
        raise OptionError(f"--resume: cannot read the checkpoint's settings: {error}") from None
    before, now, fields = shaping_settings(earlier), shaping_settings(config), leaf_fields(config)
    return [
        f"{flag(name, fields[name][1].metadata)}: checkpoint {before[name]!r}, now {now[name]!r}"
        for name in before
        if before[name] != now.get(name)
    ]


def _from_yaml(kind: type, path: Path) -> Any:
    import yaml

    from embeddistill.config import apply_overrides

    config = kind()
    apply_overrides(config, yaml.safe_load(path.read_text(encoding="utf-8")) or {}, source=str(path))
    return config


def record_settings(config: Any, path: Path) -> None:
    """Write ``config`` as YAML to ``path`` (atomically), for a later ``--resume`` to compare with."""
    import yaml

    from embeddistill.storage import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))


def resume_command(argv: list[str]) -> str:
    """The command line that continues an interrupted run: the same one, with ``--resume`` and no ``--overwrite``."""
    import shlex

    kept = [arg for arg in argv if arg not in ("--overwrite", "--no-resume")]
    if "--resume" not in kept:
        kept.append("--resume")
    return shlex.join(["embeddistill", *kept])
