"""``python -m onwards_trio``: the same as the ``onwards-trio`` command."""

import sys

from ._cli import main

sys.exit(main())
