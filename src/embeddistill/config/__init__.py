"""Configuration: dataclasses with help text, loadable from YAML, overridable by command-line flags.

One system for every command: a field is declared once with :func:`option` (default, help, choices), and
:func:`add_config_arguments` turns every field into a flag, so no default is ever written twice. Every field name
is unique across sections, so each field is also a flag (``--learning-rate 2e-4``), and a YAML file may be nested
by section (``training: {learning_rate: 1e-3}``) or flat; as sections are only flattened, files written before the
cross-encoder fields moved into their own ``ce`` section (``model: {cross_encoder: ...}``) still load unchanged.

``options`` holds that machinery; ``distill`` the settings of ``embeddistill distill`` (:class:`DistillConfig` and
its sections); ``recipe`` the defaults that depend on the student (``auto``); ``teacher_training`` those of
``embeddistill train-teacher``.
"""

from embeddistill.config.distill import (
    MIN_BATCH_SIZE,
    CrossEncoderConfig,
    DataConfig,
    DistillConfig,
    EvaluationConfig,
    LossConfig,
    ModelConfig,
    TeacherApiConfig,
    TrainingConfig,
    config_from_args,
)
from embeddistill.config.options import (
    add_config_arguments,
    apply_arguments,
    apply_overrides,
    flatten,
    leaf_fields,
    option,
    sections,
)
from embeddistill.config.recipe import resolve_student_recipe, starts_whole_pretrained
from embeddistill.config.teacher_training import TeacherTrainingConfig

__all__ = [
    "MIN_BATCH_SIZE",
    "CrossEncoderConfig",
    "DataConfig",
    "DistillConfig",
    "EvaluationConfig",
    "LossConfig",
    "ModelConfig",
    "TeacherApiConfig",
    "TeacherTrainingConfig",
    "TrainingConfig",
    "add_config_arguments",
    "apply_arguments",
    "apply_overrides",
    "config_from_args",
    "flatten",
    "leaf_fields",
    "option",
    "resolve_student_recipe",
    "sections",
    "starts_whole_pretrained",
]
