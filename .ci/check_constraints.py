"""Is every installed distribution the version constraints.txt names? (.ci/run)

Prints one line: how many distributions match, or which differ or are not listed (then exit 1:
the environment holds versions CI did not record; `bash .ci/lock` records a new set).
"""

from __future__ import annotations

import re
import sys
from importlib import metadata

OURS = re.compile(r"^zsbir(-[a-z]+)?$")
BOOTSTRAP = {"pip"}  # the environment's own installer


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main(path: str) -> int:
    pinned = {}
    for line in open(path, encoding="utf-8"):
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pinned[_norm(name)] = version.strip()
    installed = {_norm(d.metadata["Name"]): d.version for d in metadata.distributions()}
    differ = [f"{n} {v} (constraints: {pinned[n]})" for n, v in sorted(installed.items())
              if n in pinned and pinned[n] != v]
    unlisted = [f"{n} {v}" for n, v in sorted(installed.items())
                if n not in pinned and n not in BOOTSTRAP and not OURS.match(n)]
    if differ or unlisted:
        print("installed versions that constraints.txt does not record: "
              + "; ".join(differ + [f"{u} (not listed)" for u in unlisted]))
        return 1
    print(f"   {sum(n in pinned for n in installed)} distributions, each the version "
          "constraints.txt names")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
