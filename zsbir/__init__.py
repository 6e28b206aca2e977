"""zsbir: zero-shot sketch-based image retrieval, assembled from TOML manifests.

The path through the code: ``manifest.toml`` -> :func:`zsbir.manifest.load` ->
:func:`zsbir.manifest.resolve` (validated, every problem at once) ->
:func:`zsbir.build.build` (names -> registered objects) ->
:func:`zsbir.engine.run.run_experiment` (train, embed, hash, evaluate, write RUN_DIR).
"""

__version__ = "0.1.0"


def __getattr__(name: str):  # noqa: ANN202 - lazy: `import zsbir` stays light
    """``zsbir.Index`` (:class:`zsbir.search.api.Index`), imported on first use."""
    if name == "Index":
        from zsbir.search.api import Index

        return Index
    raise AttributeError(f"module 'zsbir' has no attribute {name!r}")
