"""Refuse commit subjects longer than 72 characters among the commits a branch adds.

``git log --oneline``, GitHub and mail clients cut longer subjects; the house style is
"Area: what changed" in one short line, the detail in the body.

    python3 scripts/check_commits.py            # the commits of HEAD that main lacks
    python3 scripts/check_commits.py BASE..TIP  # any git revision range

Exit status 0 when every subject fits, 1 (listing the offenders) when one does not.
"""

from __future__ import annotations

import subprocess
import sys

LIMIT = 72


def long_subjects(revisions: str, *, cwd: str | None = None) -> list[tuple[str, str]]:
    """``(short hash, subject)`` of each commit in ``revisions`` (merges left out: git writes
    their subjects) whose subject is longer than :data:`LIMIT` characters."""
    out = subprocess.run(
        ["git", "log", "--no-merges", "--format=%h%x00%s", revisions],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    commits = (line.split("\0", 1) for line in out.splitlines() if line)
    return [(sha, subject) for sha, subject in commits if len(subject) > LIMIT]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    found = long_subjects(args[0] if args else "main..HEAD")
    for sha, subject in found:
        print(f"{sha}: subject of {len(subject)} characters (at most {LIMIT}): {subject}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
