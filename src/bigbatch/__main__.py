"""``python -m bigbatch`` runs the command line (and so does ``torchrun -m bigbatch``)."""

import sys

from .app.cli import main

sys.exit(main())
