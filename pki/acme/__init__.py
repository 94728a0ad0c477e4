"""The ACME server's core (RFC 8555): JWS checks, nonces, accounts, orders, challenges.

:class:`pki.acme.service.Acme` holds the use-cases; ``acme_server`` is the thin Flask
layer that speaks HTTP for them. Validation (the VA) is :mod:`pki.validation`.
"""
