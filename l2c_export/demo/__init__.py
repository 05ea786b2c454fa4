"""The embedded digits models (their training, the digits classifier) and ``eval``: what a schedule buys at
equal MACs."""
