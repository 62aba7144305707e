"""``python -m kp_plugin``: the ``kp`` command."""

from .cli import main

raise SystemExit(main())
