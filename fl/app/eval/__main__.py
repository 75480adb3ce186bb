"""`python -m fl.app.eval`: same as `fl-eval`."""

from fl.app.eval.cli import main

main()
