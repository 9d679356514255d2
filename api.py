"""Entry point: ``python api.py --help``. Serves on 0.0.0.0:8100 by default."""

import sys

from glm_api.cli import main

if __name__ == "__main__":
    sys.exit(main())
