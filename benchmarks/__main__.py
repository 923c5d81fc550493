"""``python -m benchmarks``: bigbatch against the hand loop, Accelerate and Lightning.

See :mod:`benchmarks.peers` for what is measured and how; ``--help`` lists the flags.
"""

import sys

from .peers import main

sys.exit(main())
