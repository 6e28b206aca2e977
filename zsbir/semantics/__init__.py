"""WordNet similarity between benchmark classes and the ImageNet-1k classes (SAKE's A).

SAKE (Liu et al., ICCV 2019, Sec. 3.4, "Semantic Constraints of the Teacher Signal")
refines the ImageNet teacher's logits ``t_i`` of a sample of class ``y_i`` with a row of a
semantic similarity matrix ``A``::

    q_i = softmax(lambda1 * t_i + lambda2 * a_{y_i}),      a_k in R^1000,

where ``a_{k,m}`` is the WordNet path similarity between benchmark class ``k`` and
ImageNet class ``m`` (Sec. 4.1: "We map each category to a node in WordNet and use the
path-similarity to set a_{k,m}", via nltk). :func:`semantic_matrix` computes
``A`` (n_classes, 1000), caches it on disk and reuses it.

Class name -> WordNet noun synset (:func:`resolve_synsets`), first rule that applies:

1. a user mapping file (TOML or JSON, ``"class name" = "dog.n.01"``; a wnid such as
   ``"n02084071"``, a list of synsets whose rows are max-combined, or ``""``/``[]``/null
   for "no synset");
2. the built-in table :data:`BUILTIN_SYNSETS` (names whose first WordNet sense is not the
   depicted object, or that WordNet spells differently; covers Sketchy, TU-Berlin and
   QuickDraw);
3. the first noun sense of the normalized name (``teddy-bear``/``teddy bear`` ->
   ``teddy_bear``; ``_``, ``-`` and no separator are tried, so ``hot-air_balloon`` and
   ``wrist-watch`` resolve); a parenthesized qualifier (``crane (machine)``) picks the
   sense of the head word closest to the qualifier.

Classes without a synset get a zero row and are listed in one warning.

WordNet must be available offline: :func:`ensure_wordnet` uses nltk's own ``wordnet``
corpus if nltk finds one, else builds nltk's layout from the Debian/Ubuntu packages
``wordnet-base`` + ``wordnet-sense-index`` (``/usr/share/wordnet``) under
``<cache_dir>/nltk_data/corpora/wordnet``.

Modules: :mod:`.wordnet` (finding and loading WordNet), :mod:`.similarity` (class names to
synsets, the matrix and its cache), :mod:`.cli` (``python -m zsbir.semantics``). Every name
importable from ``zsbir.semantics`` before still is.
"""

from zsbir.semantics.cli import main as main
from zsbir.semantics.similarity import (
    BUILTIN_SYNSETS,
    imagenet_wnids,
    normalize_class_name,
    resolve_synsets,
    semantic_matrix,
)
from zsbir.semantics.similarity import (
    Similarity as Similarity,
)
from zsbir.semantics.wordnet import (
    LEXNAMES,
    WordNetNotFoundError,
    build_wordnet_layout,
    ensure_wordnet,
    load_wordnet,
)

__all__ = [
    "BUILTIN_SYNSETS",
    "LEXNAMES",
    "WordNetNotFoundError",
    "build_wordnet_layout",
    "ensure_wordnet",
    "imagenet_wnids",
    "load_wordnet",
    "normalize_class_name",
    "resolve_synsets",
    "semantic_matrix",
]
