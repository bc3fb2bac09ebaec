"""``python -m polyray.cli``: the same as the ``polyray`` command (used where no script is installed)."""

from polyray.cli import main

raise SystemExit(main())
