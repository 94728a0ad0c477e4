"""Figures of the reliability tests (issue #8): printed, and collected when asked.

``record("scale-out", requests=12, certificates=4)`` prints one line
``[reliability] scale-out: requests=12 certificates=4`` and, when the environment variable
``HSMCA_FIGURES`` names a file, appends the same figures to it as one JSON line
(``{"part": "scale-out", "requests": 12, "certificates": 4}``).
"""

from __future__ import annotations

import json
import os

PREFIX = "[reliability]"


def record(part: str, **figures: object) -> None:
    """Print ``figures`` of ``part`` on one line; append them as JSON to ``$HSMCA_FIGURES``."""
    print(f"{PREFIX} {part}: " + " ".join(f"{k}={v}" for k, v in figures.items()), flush=True)
    target = os.environ.get("HSMCA_FIGURES")
    if target:
        line = json.dumps({"part": part, **figures}, default=str, sort_keys=False)
        with open(target, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")


def main(path: str) -> None:
    """Print every figure collected in ``path`` (``make test`` does, after the suite)."""
    try:
        with open(path, encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
    except FileNotFoundError:
        rows = []
    print(f"{PREFIX} figures of this run ({len(rows)}):")
    for row in sorted(rows, key=lambda r: str(r.get("part"))):
        part = row.pop("part", "?")
        print(f"{PREFIX} {part}: " + " ".join(f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    import sys

    main(sys.argv[1])
