"""ACME orders record when they started processing, so an order whose finalize was cut
off (a crash between the pending row and the signed certificate) can be failed

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26 11:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from pki.store.models import UTCDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("acme_orders", schema=None) as batch_op:
        batch_op.add_column(sa.Column("processing_since", UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("acme_orders", schema=None) as batch_op:
        batch_op.drop_column("processing_since")
