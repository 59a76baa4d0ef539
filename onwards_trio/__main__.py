"""``python -m onwards_trio``: the same as the ``onwards-trio`` command."""

import sys

from onwards_trio._app.cli import main

sys.exit(main())
