"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-26 02:26:42.858791
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import pki.store.models

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("token_sha256", sa.String(length=64), nullable=False),
        sa.Column("allowed_names", sa.JSON(), nullable=False),
        sa.Column("profiles", sa.JSON(), nullable=False),
        sa.Column("max_ttl_seconds", sa.Integer(), nullable=True),
        sa.Column("single_use", sa.Boolean(), nullable=False),
        sa.Column("used_at", pki.store.models.UTCDateTime(), nullable=True),
        sa.Column("expires_at", pki.store.models.UTCDateTime(), nullable=True),
        sa.Column("revoked_at", pki.store.models.UTCDateTime(), nullable=True),
        sa.Column("created_at", pki.store.models.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
        sa.UniqueConstraint("name", name=op.f("uq_api_tokens_name")),
        sa.UniqueConstraint("token_sha256", name=op.f("uq_api_tokens_token_sha256")),
    )
    op.create_table(
        "audit_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("at", pki.store.models.UTCDateTime(), nullable=False),
        sa.Column("actor", sa.String(length=255), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("subject", sa.String(length=255), nullable=True),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_events")),
    )
    op.create_table(
        "issuers",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("parent_id", sa.String(length=64), nullable=True),
        sa.Column("key_label", sa.String(length=200), nullable=False),
        sa.Column("key_type", sa.String(length=16), nullable=False),
        sa.Column("der", sa.LargeBinary(), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("ski", sa.String(length=128), nullable=False),
        sa.Column("not_before", pki.store.models.UTCDateTime(), nullable=False),
        sa.Column("not_after", pki.store.models.UTCDateTime(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("ocsp_key_label", sa.String(length=200), nullable=True),
        sa.Column("ocsp_serial", sa.String(length=64), nullable=True),
        sa.Column("crl_number", sa.BigInteger(), nullable=False),
        sa.Column("created_at", pki.store.models.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["parent_id"], ["issuers.id"], name=op.f("fk_issuers_parent_id_issuers")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_issuers")),
        sa.UniqueConstraint("key_label", name=op.f("uq_issuers_key_label")),
    )
    op.create_table(
        "certificates",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("serial", sa.String(length=64), nullable=False),
        sa.Column("issuer_id", sa.String(length=64), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("common_name", sa.String(length=255), nullable=True),
        sa.Column("sans", sa.JSON(), nullable=False),
        sa.Column("profile", sa.String(length=64), nullable=False),
        sa.Column("requester", sa.String(length=255), nullable=False),
        sa.Column("public_key_sha256", sa.String(length=64), nullable=False),
        sa.Column("spki", sa.LargeBinary(), nullable=False),
        sa.Column("not_before", pki.store.models.UTCDateTime(), nullable=False),
        sa.Column("not_after", pki.store.models.UTCDateTime(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("revoked_at", pki.store.models.UTCDateTime(), nullable=True),
        sa.Column("revocation_reason", sa.String(length=32), nullable=True),
        sa.Column("invalidity_date", pki.store.models.UTCDateTime(), nullable=True),
        sa.Column("der", sa.LargeBinary(), nullable=True),
        sa.Column("crl_shard", sa.SmallInteger(), nullable=False),
        sa.Column("created_at", pki.store.models.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["issuer_id"], ["issuers.id"], name=op.f("fk_certificates_issuer_id_issuers")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_certificates")),
        sa.UniqueConstraint("serial", name=op.f("uq_certificates_serial")),
    )
    with op.batch_alter_table("certificates", schema=None) as batch_op:
        batch_op.create_index(
            "ix_certificates_pending_created_at",
            ["created_at"],
            unique=False,
            sqlite_where=sa.text("status = 'pending'"),
            postgresql_where=sa.text("status = 'pending'"),
        )
        batch_op.create_index(
            "ix_certificates_revoked_issuer",
            [
                "issuer_id",
                "not_after",
                "revoked_at",
                "serial",
                "revocation_reason",
                "invalidity_date",
                "crl_shard",
                "status",
            ],
            unique=False,
            sqlite_where=sa.text("status = 'revoked'"),
            postgresql_where=sa.text("status = 'revoked'"),
        )
        batch_op.create_index(
            "ix_certificates_status_not_after", ["status", "not_after"], unique=False
        )

    op.create_table(
        "crls",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("issuer_id", sa.String(length=64), nullable=False),
        sa.Column("shard", sa.SmallInteger(), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("number", sa.BigInteger(), nullable=False),
        sa.Column("base_number", sa.BigInteger(), nullable=True),
        sa.Column("entries", sa.Integer(), nullable=False),
        sa.Column("built_at", pki.store.models.UTCDateTime(), nullable=False),
        sa.Column("this_update", pki.store.models.UTCDateTime(), nullable=False),
        sa.Column("next_update", pki.store.models.UTCDateTime(), nullable=False),
        sa.Column("der", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["issuer_id"], ["issuers.id"], name=op.f("fk_crls_issuer_id_issuers")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_crls")),
    )
    with op.batch_alter_table("crls", schema=None) as batch_op:
        batch_op.create_index(
            "ix_crls_issuer_shard_kind_number",
            ["issuer_id", "shard", "kind", "number"],
            unique=False,
        )

    op.create_table(
        "ocsp_responses",
        sa.Column("serial", sa.String(length=64), nullable=False),
        sa.Column("hash_algorithm", sa.String(length=8), nullable=False),
        sa.Column("issuer_id", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=8), nullable=False),
        sa.Column("this_update", pki.store.models.UTCDateTime(), nullable=False),
        sa.Column("next_update", pki.store.models.UTCDateTime(), nullable=False),
        sa.Column("der", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["issuer_id"], ["issuers.id"], name=op.f("fk_ocsp_responses_issuer_id_issuers")
        ),
        sa.PrimaryKeyConstraint("serial", "hash_algorithm", name=op.f("pk_ocsp_responses")),
    )
    with op.batch_alter_table("ocsp_responses", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_ocsp_responses_next_update"), ["next_update"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("ocsp_responses", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ocsp_responses_next_update"))

    op.drop_table("ocsp_responses")
    with op.batch_alter_table("crls", schema=None) as batch_op:
        batch_op.drop_index("ix_crls_issuer_shard_kind_number")

    op.drop_table("crls")
    with op.batch_alter_table("certificates", schema=None) as batch_op:
        batch_op.drop_index("ix_certificates_status_not_after")
        batch_op.drop_index(
            "ix_certificates_revoked_issuer",
            sqlite_where=sa.text("status = 'revoked'"),
            postgresql_where=sa.text("status = 'revoked'"),
        )
        batch_op.drop_index(
            "ix_certificates_pending_created_at",
            sqlite_where=sa.text("status = 'pending'"),
            postgresql_where=sa.text("status = 'pending'"),
        )

    op.drop_table("certificates")
    op.drop_table("issuers")
    op.drop_table("audit_events")
    op.drop_table("api_tokens")
