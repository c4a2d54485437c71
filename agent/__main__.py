"""`python -m agent` is the same as the `esim-agent` console script."""
import sys

from .cli import main

sys.exit(main())
