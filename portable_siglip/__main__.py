"""``python -m portable_siglip``: see :mod:`portable_siglip._cli`."""

from ._cli import main

raise SystemExit(main())
