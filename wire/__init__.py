"""The Flower encoding of fedslm's messages, shared by the site and the coordinator.

Installed as ``fedslm.wire``: the ClientApp (``fedslm.clients``) and the ServerApp
(``fedslm.server``) both import it, so neither side imports the other's package. The messages
themselves, without Flower, are ``fedslm.messages``.
"""
