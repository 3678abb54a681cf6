"""Using a trained student: index a corpus, search it, serve it over HTTP, export the query encoder to ONNX.

* :mod:`~embeddistill.serving.indexing`: ``FlatIndex`` (exact, used by evaluation) and ``SearchIndex``
  (saved FAISS flat/HNSW/IVF-PQ index).
* :mod:`~embeddistill.serving.search`: ``Searcher`` (query encoder + index), ``encode_corpus``.
* :mod:`~embeddistill.serving.http`: the FastAPI service with micro-batching and request limits.
* :mod:`~embeddistill.serving.onnx`: ONNX export of the query encoder (fp32, int8), checked by
  :mod:`~embeddistill.serving.onnx_parity`; ``OnnxQueryEncoder`` (:mod:`~embeddistill.serving.onnx_runtime`).

Nothing is imported here: FastAPI and onnxruntime are optional extras, loaded only by the module that needs them.
"""
