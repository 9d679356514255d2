import sys

from glm_api.cli import main

sys.exit(main())
