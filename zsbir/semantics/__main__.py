"""``python -m zsbir.semantics CLASSES.txt [MAPPING]`` (:func:`zsbir.semantics.cli.main`)."""

from zsbir.semantics.cli import main

raise SystemExit(main())
