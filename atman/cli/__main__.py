"""``python -m atman.cli``: the same as the ``atman`` command."""

import sys

from atman.cli import main

sys.exit(main())
