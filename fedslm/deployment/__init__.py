"""Deployment: the coordinator service and the site daemon on Flower's deployment engine.

Configuration schemas live in ``fedslm.deployment.config``; the coordinator's commands in
``fedslm.deployment.coordinator``; the site daemon (which imports Flower) in
``fedslm.clients.daemon``. Nothing here imports Flower: the Flower processes are started as
programs (``flower-superlink``, ``flower-supernode``, ``flwr``).
"""
