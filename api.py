"""Entry point: ``python api.py --help``. Serves on 0.0.0.0:8100 by default."""

import sys

from glm_api.huge_pages import prefer_huge_pages

prefer_huge_pages()  # before torch is imported (see glm_api/huge_pages.py)

from glm_api.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
