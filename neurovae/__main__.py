"""``python -m neurovae`` runs the command line interface."""

import sys

from neurovae.cli import main

if __name__ == "__main__":
    sys.exit(main())
