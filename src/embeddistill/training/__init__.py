"""Training: one loop (:mod:`.loop`) under every trainer, the batchers (:mod:`.batching`), the distillation
trainers (:mod:`.distillation`), the label-free check during training (:mod:`.validation`), averaging the trained
weights with the start (:mod:`.merging`), fine-tuning of a cross-encoder teacher (:mod:`.teacher_finetuning`) and
multi-process runs (:mod:`.distributed`).

Import from the submodules; this package imports nothing itself, so that :mod:`embeddistill.runtime` and the model
caches can use :mod:`.distributed` without loading the trainers.
"""
