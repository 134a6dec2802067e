"""The shell commands of the documentation: every line of every ```bash block in README.md and docs/**/*.md,
continuation lines joined, comments dropped."""

from __future__ import annotations

import re
from pathlib import Path

FENCE = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)


def commands(root: Path) -> list[tuple[str, str]]:
    """(command, file it is in) for each command, in document order; repeats kept once."""
    found: dict[str, str] = {}
    for page in [root / "README.md", *sorted((root / "docs").rglob("*.md"))]:
        for block in FENCE.findall(page.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"\s+#\s.*$", "", line).strip()  # a trailing comment explains, it is not typed
                if line and not line.startswith("#"):
                    found.setdefault(" ".join(line.split()), str(page.relative_to(root)))
    return list(found.items())
