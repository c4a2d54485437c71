"""`python -m agent` is the same as the `esim-agent` console script."""
from .entry import run

run()
