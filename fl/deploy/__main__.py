"""`python -m fl.deploy`: same as `fl-deploy`."""

from fl.deploy.cli import main

main()
