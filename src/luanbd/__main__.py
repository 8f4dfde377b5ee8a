"""``python -m luanbd``: the same as the ``luanbd`` command."""

from luanbd.cli import main

raise SystemExit(main())
