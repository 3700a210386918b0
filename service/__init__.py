"""alphawatch service: the database layer and the public REST API."""
