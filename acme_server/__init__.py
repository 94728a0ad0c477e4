"""The ACME server (RFC 8555) as a Flask blueprint: the thin web layer over
:class:`pki.acme.service.Acme`. Mounted at ``/acme`` on the HTTPS listener."""

from acme_server.views import acme

__all__ = ["acme"]
