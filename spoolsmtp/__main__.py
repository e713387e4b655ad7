"""``python -m spoolsmtp``: the same as the ``spoolsmtp`` command."""

import sys

from spoolsmtp.cli import main

sys.exit(main())
