"""EAB keys and the ACME accounts they create carry name patterns and profiles

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26 11:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

TABLES = ("acme_eab_keys", "acme_accounts")


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("allowed_names", sa.JSON(), nullable=True))
            batch_op.add_column(sa.Column("profiles", sa.JSON(), nullable=True))


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("profiles")
            batch_op.drop_column("allowed_names")
