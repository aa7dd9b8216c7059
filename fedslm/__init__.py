"""fedslm: federated DP-LoRA fine-tuning of small language models.

The library runs a site's local training and the coordinator's aggregation without Flower;
``fedslm.clients`` and ``fedslm.server`` (the ``clients/`` and ``server/`` folders) adapt it to
Flower's Message API.
"""

__version__ = "0.1.0"
