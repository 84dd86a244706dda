"""``python -m neurovae`` runs the command line interface."""

import sys

from neurovae.cli import main

sys.exit(main())
