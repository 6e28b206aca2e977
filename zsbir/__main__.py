"""``python -m zsbir`` (what ``torchrun ... -m zsbir run MANIFEST`` starts per process)."""

from zsbir.cli import main

if __name__ == "__main__":  # pragma: no cover
    main(prog_name="zsbir")
