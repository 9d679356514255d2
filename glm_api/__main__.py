import sys

from glm_api.huge_pages import prefer_huge_pages

prefer_huge_pages()  # before torch is imported (see glm_api/huge_pages.py)

if sys.argv[1:2] == ["batch"]:  # python -m glm_api batch INPUT.jsonl -o OUTPUT.jsonl
    from glm_api.batch_cli import main as batch_main

    sys.exit(batch_main(sys.argv[2:]))

from glm_api.cli import main

sys.exit(main())
