"""The batcher's epochs: which training queries a run shows, how often, in a reproducible order."""

import numpy as np
import pytest

from embeddistill.config import TrainingConfig
from embeddistill.training.batching import Batcher, TrainingQueries, real_query_repeats
from embeddistill.training.distillation import repeats_of


def queries(generated: list[bool]) -> TrainingQueries:
    n = len(generated)
    return TrainingQueries(
        texts=[f"q{i}" for i in range(n)],
        teacher_embeddings=np.zeros((n, 4), dtype=np.float32),
        anchors=np.arange(n),
        positives=[[] for _ in range(n)],
        negative_pool=np.full((n, 0), -1),
        generated=np.array(generated),
    )


def epoch_rows(batcher: Batcher, epoch: int) -> list[int]:
    steps = range(epoch * batcher.steps_per_epoch, (epoch + 1) * batcher.steps_per_epoch)
    return sorted(int(row) for step in steps for row in batcher.batch(step)["rows"])


def test_an_epoch_shows_each_real_query_as_often_as_asked_and_each_generated_one_once():
    batcher = Batcher(queries([False, True, True, False, True]), batch_size=4, hard_negatives=0, seed=1, real_repeats=3)
    assert batcher.steps_per_epoch == 3  # 2 real x 3 + 3 generated = 9 rows
    for epoch in (0, 1):
        assert epoch_rows(batcher, epoch) == [0, 0, 0, 1, 2, 3, 3, 3, 4]
    assert batcher._epoch_order(0).tolist() != batcher._epoch_order(1).tolist()  # reshuffled each epoch


def test_one_repeat_keeps_the_plain_seeded_permutation():
    batcher = Batcher(queries([False, True, True, False, True]), batch_size=2, hard_negatives=0, seed=7)
    assert batcher.steps_per_epoch == 3
    assert batcher._epoch_order(2).tolist() == np.random.default_rng([7, 2]).permutation(5).tolist()


@pytest.mark.parametrize(
    ("passes", "epochs", "repeats"), [(6, 2, 3), (6, 6, 1), (6, 4, 2), (6, 12, 1), (0, 2, 1), (1, 2, 1)]
)
def test_real_query_passes_become_repeats_per_epoch(passes, epochs, repeats):
    assert real_query_repeats(passes, epochs) == repeats
    assert repeats_of(TrainingConfig(epochs=epochs, real_query_passes=passes, max_steps=0)) == repeats


def test_repeats_refuse_unresolved_epochs():
    with pytest.raises(ValueError, match="epochs"):
        repeats_of(TrainingConfig())
