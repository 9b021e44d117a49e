"""``python -m manifest_lint [FILE ...]`` (from tests/): print the deployment files' problems; exit 1 if any."""

import sys

from .checks import main

sys.exit(main())
