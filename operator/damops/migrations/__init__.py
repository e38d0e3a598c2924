"""Numbered SQL migrations, applied in order by :func:`damops.db.migrate`."""
