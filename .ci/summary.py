"""CI's last lines: how many tests ran, and that no browser or docs-site test skipped.

Reads the counts conftest.py writes to $ZSBIR_CI_SUMMARY; exit 1 when the browser or docs
tests did not all run (a skip there means an install step of .ci/run broke).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(path: str) -> int:
    text = Path(path).read_text(encoding="utf-8").strip()
    if not text:
        print("error: pytest wrote no summary (it did not get to run the tests)")
        return 1
    s = json.loads(text)
    ran = s["passed"] + s["failed"] + s["skipped"]
    bd = s["browser_docs_passed"] + s["browser_docs_failed"] + s["browser_docs_skipped"]
    print(f"tests run: {ran} ({s['collection_errors']} collection errors); browser and "
          f"docs-site tests: {bd} run, {s['browser_docs_skipped']} skipped")
    bad = s["browser_docs_skipped"] > 0 or bd == 0
    if bad:
        print("error: browser or docs-site tests did not all run")
    print(f"summary: {s['passed']} passed, {s['failed']} failed, {s['skipped']} skipped")
    return 1 if bad or s["failed"] or s["collection_errors"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
