"""The URLs of the ACME resources, from one base (``https://host:port/acme``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AcmeUrls:
    """Builds and parses resource URLs under ``base`` (no trailing slash)."""

    base: str

    @property
    def directory(self) -> str:
        return f"{self.base}/directory"

    @property
    def new_nonce(self) -> str:
        return f"{self.base}/new-nonce"

    @property
    def new_account(self) -> str:
        return f"{self.base}/new-account"

    @property
    def new_order(self) -> str:
        return f"{self.base}/new-order"

    @property
    def revoke_cert(self) -> str:
        return f"{self.base}/revoke-cert"

    @property
    def key_change(self) -> str:
        return f"{self.base}/key-change"

    @property
    def renewal_info(self) -> str:
        return f"{self.base}/renewal-info"

    @property
    def terms(self) -> str:
        return f"{self.base}/terms"

    def account(self, account_id: int) -> str:
        return f"{self.base}/acct/{account_id}"

    def account_orders(self, account_id: int) -> str:
        return f"{self.base}/acct/{account_id}/orders"

    def order(self, order_id: str) -> str:
        return f"{self.base}/order/{order_id}"

    def finalize(self, order_id: str) -> str:
        return f"{self.base}/order/{order_id}/finalize"

    def authorization(self, authz_id: str) -> str:
        return f"{self.base}/authz/{authz_id}"

    def challenge(self, challenge_id: str) -> str:
        return f"{self.base}/chall/{challenge_id}"

    def certificate(self, serial: str) -> str:
        return f"{self.base}/cert/{serial}"

    def account_id(self, kid: str) -> int | None:
        """The account id named by a ``kid`` URL, or None if it is not one of ours."""
        prefix = f"{self.base}/acct/"
        if not kid.startswith(prefix):
            return None
        tail = kid[len(prefix) :]
        return int(tail) if tail.isdigit() and len(tail) < 19 else None
