"""``python -m streaming``: see :mod:`streaming.cli`."""

import sys

from streaming.cli import main

sys.exit(main())
