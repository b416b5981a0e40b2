"""``python -m portable_siglip``: see :mod:`portable_siglip.cli`."""

from .cli._commands import main

raise SystemExit(main())
