"""The coordinator side on Flower: ServerApp, strategy and simulation (``fedslm.server``)."""
