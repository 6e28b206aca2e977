"""zsbir-rpkd: Relationship-Preserving Knowledge Distillation (Tian et al., ACM MM 2021)
for zero-shot sketch-based image retrieval, as a zsbir plugin.

Only the paper's abstract is public, so the formulas here are this plugin's reading of
it; each component's docstring states exactly what it computes.

- :mod:`zsbir_rpkd.losses`: ``rpkd_instance`` (instance-level distillation),
  ``rpkd_contrastive`` (contrastive relationships among a batch's items) and
  ``rpkd_embedding_supervision`` (embedding-induced supervision of the classifier);
- :mod:`zsbir_rpkd.teacher`: the ``rpkd`` teacher strategy (per-item logits and
  features, plus seen-class centers computed once before training).

They are registered only through the entry points in this distribution's
``pyproject.toml``; importing this package registers nothing.
"""

__version__ = "0.1.0"
