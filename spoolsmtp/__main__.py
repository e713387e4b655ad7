"""``python -m spoolsmtp``: the same as the ``spoolsmtp`` command."""

import sys

from spoolsmtp.app.cli import main

sys.exit(main())
