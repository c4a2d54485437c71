"""`python -m agent` is the same as the `esim-agent` console script."""
from .cli import run

run()
