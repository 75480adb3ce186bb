"""The top of the house: ServerApp, ClientApp, the per-process workspace, the simulation runner, the CLI.

With `simulations/`, the only code that imports every package (fl ground, privacy, clients, strategies).
"""
