"""``python -m im``: the same as the ``im`` command."""

from im.cli import main

raise SystemExit(main())
