"""Composition roots: the `medfed` command line and the simulation launcher.

The only modules that import both roles. `federation/` (the shared core) imports
neither role; `client/` (the site) and `server/` (the coordinator) never import each
other. `make lint` checks these contracts (import-linter, `[tool.importlinter]` in
pyproject.toml).
"""
