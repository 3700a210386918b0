"""``python -m alphawatch.cli``: the same as the ``alphawatch`` console script."""

from alphawatch.cli import main

raise SystemExit(main())
