"""Database layer: models, sessions, migrations and the analysis job queue."""
