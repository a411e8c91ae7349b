"""``python -m ussbench`` entry point."""

from .cli import main

raise SystemExit(main())
