"""Portable models out of a run: ``zsbir export RUN_DIR --format onnx|torchscript``.

What is exported is exactly what zsbir's evaluation and photo search embed
(:func:`zsbir.engine.embed.embed_split`, :meth:`zsbir.engine.index.TrainedModel.embed_batch`):
``model(image, domain)["embedding"]`` of the weights in ``checkpoints/final.pt`` (the run's
evaluated weights: a component's ``inference_model()`` where one chose them), a float32
(B, d) tensor, **not** L2-normalized (zsbir's cosine scoring and index normalize it; its
hashers read it as it is); ``--normalize`` appends the L2 normalization.

- input ``image``: float32 (B, 3, S, S), each row resized and normalized with its domain's
  input configuration (the JSON beside the model file: size, mean, std, interpolation);
- input ``domain``: int64 (B,), 0 photo / 1 sketch, only where the model reads it (a
  conditional backbone such as SAKE's CSE-ResNet-50; ``towers``, which routes each row
  to its domain's tower);
- output ``embedding``: float32 (B, d).

The batch size is dynamic. Every export directory holds the model file, ``model.json``
(also in the ONNX file's ``metadata_props`` and the TorchScript archive's extra file
``zsbir.json``) and ``MODEL_CARD.md`` (:mod:`zsbir.export.card`). Before anything is
written, the exported model is run at two batch sizes on both domains (and a batch mixing
them) against the torch model: a difference is an :class:`ExportError`, never a file.

Modules: :mod:`zsbir.export.embedding` (the wrapper, the writers, the check),
:mod:`zsbir.export.card` (model cards, also written into every run directory),
:mod:`zsbir.export.command` (the command line). Importing this package imports nothing
heavy.
"""

from __future__ import annotations

__all__ = ["FORMATS", "ExportError"]

#: the export formats: (file name, what loads it)
FORMATS = {"onnx": "model.onnx", "torchscript": "model.pt"}


class ExportError(RuntimeError):
    """A run that cannot be exported as asked (no ``final.pt``, a missing package, an
    exported model that differs from the torch model); the message is one line."""
