"""The hsmca web service: a Flask app factory with one blueprint per protocol.

``create_app(home, listener="https")`` serves the REST API, ACME and EST;
``listener="http"`` serves the plain-HTTP documents (issuer certificates, CRLs, OCSP)
behind :mod:`ca_service.ocsp_front`, which answers pre-signed OCSP itself.
Views only parse input, call one :mod:`pki` use-case and format the result.
"""

from __future__ import annotations

import time
from pathlib import Path

from flask import Flask, Response, g, request
from werkzeug.middleware.proxy_fix import ProxyFix

from ca_service import metrics, problems
from ca_service.logs import configure_logging, install_request_ids, register_settings_secrets
from pki.config import load_settings, resolve_home
from pki.service import Pki

LISTENERS = ("https", "http")


def create_app(
    home: str | Path | None = None, listener: str = "https", pki: Pki | None = None
) -> Flask:
    """Build the app for ``listener``; ``pki`` injects an opened core (tests)."""
    if listener not in LISTENERS:
        raise ValueError(f"listener must be one of {LISTENERS}")
    root = resolve_home(home)
    settings = pki.settings if pki is not None else load_settings(root)
    app = Flask("hsmca")
    app.config.update(
        HSMCA_HOME=str(root),
        HSMCA_PKI=pki,
        HSMCA_LISTENER=listener,
        MAX_CONTENT_LENGTH=settings.server.max_body_bytes,
        JSON_SORT_KEYS=False,
    )
    app.json.sort_keys = False  # type: ignore[attr-defined]
    configure_logging(settings.server.log_level)
    register_settings_secrets(settings)
    install_request_ids(app)
    problems.register(app)
    _install_request_metrics(app)

    from ca_service.ocsp_views import ocsp
    from ca_service.public import public

    app.register_blueprint(public)
    app.register_blueprint(ocsp)
    if listener == "https":
        from acme_server import acme
        from ca_service.api import api
        from ca_service.dashboard import dashboard
        from ca_service.devices_api import devices
        from ca_service.est import est

        app.register_blueprint(api)
        app.register_blueprint(devices)
        app.register_blueprint(est)
        app.register_blueprint(acme)
        app.register_blueprint(dashboard)
    else:
        # served only on the Unix socket of the OCSP front end, which states the client
        # address in X-Forwarded-For (replacing whatever the client sent)
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1)  # type: ignore[method-assign]
    return app


def _install_request_metrics(app: Flask) -> None:
    @app.before_request
    def _start() -> None:
        g.metrics_started = time.perf_counter()

    @app.after_request
    def _count(response: Response) -> Response:
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        metrics.REQUESTS.labels(route, request.method, str(response.status_code)).inc()
        started = g.get("metrics_started")
        if started is not None:
            metrics.REQUEST_SECONDS.labels(route).observe(time.perf_counter() - started)
        return response
