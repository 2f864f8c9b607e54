"""`python -m kport.cli`: the `kport` command."""

import sys

from kport.cli import main

sys.exit(main())
