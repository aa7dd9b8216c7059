"""The site side on Flower: the ClientApp that runs fedslm's local training (``fedslm.clients``)."""
