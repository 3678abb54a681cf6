"""How good and how fast a model is, whether a difference is real, and the run's human-readable outputs.

* :mod:`~embeddistill.evaluation.metrics`: exact search, TREC runs, ir_measures scores (``score_run``,
  ``RunResult``, ``evaluate_model`` behind ``embeddistill evaluate``).
* :mod:`~embeddistill.evaluation.latency`: CPU query-encoding latency (``measure_latency``).
* :mod:`~embeddistill.evaluation.significance`: the paired permutation test the benchmarks report.
* :mod:`~embeddistill.evaluation.reranking`: a cross-encoder rescoring a first-stage run.
* :mod:`~embeddistill.evaluation.report` and :mod:`~embeddistill.evaluation.model_card`: ``report.md`` and the
  student's ``README.md``, from a run's :class:`~embeddistill.pipeline.summary.RunSummary`.

Nothing is imported here, so ``import embeddistill.evaluation.significance`` does not load torch.
"""
