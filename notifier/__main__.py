"""``python -m notifier`` is the same as the ``notifier`` command."""

import sys

from notifier.cli import main

if __name__ == "__main__":
    sys.exit(main())
