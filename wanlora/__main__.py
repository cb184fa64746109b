"""`python -m wanlora`: the `wanlora` command."""

import sys

from .frontends.cli import main

sys.exit(main())
