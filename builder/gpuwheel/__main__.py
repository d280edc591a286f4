"""`python -m gpuwheel`: the CLI without an installed console script (e.g. from a checkout)."""

from gpuwheel.cli import main

main(prog_name="gpuwheel")
