"""zsbir-clip: CLIP towers and the prompt-learning ZS-SBIR method of Sain et al., "CLIP for
All Things Zero-Shot Sketch-Based Image Retrieval, Fine-Grained or Not" (CVPR 2023), as a
zsbir plugin.

- :mod:`zsbir_clip.towers`: backbone ``clip_vit`` (CLIP's image tower with per-domain
  visual prompts) and network ``clip_text`` (the frozen text tower), ViT-B/32 or ViT-B/16,
  weights only from a local open_clip file;
- :mod:`zsbir_clip.head`: head ``clip_text_classifier`` (normalized image embedding,
  logits against the text embeddings of "a photo of a {class}");
- :mod:`zsbir_clip.losses`: loss ``clip_triplet`` (cosine triplet, margin 0.2, on the
  core ``triplet`` sampler's tuples).

The paper's two learning rates (LayerNorms 1e-4, prompts 1e-3) are the core ``adam`` with
an ``[[optimizer.groups]]`` entry for ``model.backbone.prompts`` (see the examples).

They are registered only through the entry points in this distribution's
``pyproject.toml``; importing this package registers nothing, and zsbir itself never
imports it.
"""

__version__ = "0.1.0"
