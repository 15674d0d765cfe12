"""``python -m dockpart ARGS`` is ``dockpart ARGS`` (the apps' git hooks run it this way)."""

import sys

from dockpart.deploy.cli import main

sys.exit(main())
