"""``python -m dockpart.deploy ARGS`` is ``dockpart deploy ARGS``."""

import sys

from dockpart.deploy.cli import main

sys.exit(main(["deploy", *sys.argv[1:]]))
