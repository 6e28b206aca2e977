"""zsbir-zse: ZSE-SBIR (Lin, Li, Li, Hospedales, Song and Qi, "Zero-Shot Everything
Sketch-Based Image Retrieval, and in Explainable Style", CVPR 2023; code:
github.com/buptLinfy/ZSE-SBIR) as a zsbir plugin.

- :mod:`zsbir_zse.vit`: the self-attention module (ViT-B/16, learnable tokenizer with the
  scale embedding, token selection);
- :mod:`zsbir_zse.cross`: the cross-attention module, the down-sampling and the kernel-based
  relation network;
- :mod:`zsbir_zse.model`: model ``zse`` (outputs ``embedding``, ``tokens``, ``zse_ca``);
- :mod:`zsbir_zse.training`: sampler ``zse``, step ``zse_pairs``, losses ``zse_triplet`` and
  ``zse_relation``;
- :mod:`zsbir_zse.scorer`: pair scorer ``zse_rn`` (exhaustive and top-K re-scoring);
- :mod:`zsbir_zse.weights`: the authors' ``sam_ViT-B_16.pth`` and checkpoint files.

Registered only through the entry points of this distribution's ``pyproject.toml``;
zsbir itself never imports it.
"""

__version__ = "0.1.0"
