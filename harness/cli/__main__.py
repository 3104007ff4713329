"""``python -m afterclose.harness.cli``: the same as the ``afterclose`` command."""

import sys

from afterclose.harness.cli import main

sys.exit(main())
