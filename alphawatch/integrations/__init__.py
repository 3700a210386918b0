"""Integrations with the tools training already runs in.

``hf`` and ``lightning`` hold training-loop callbacks: they run inside the user's training
process, so they import only the standard library (``link``) and their framework, never the
service, the database or the settings. ``export`` writes the stored robust statistics to
experiment trackers (MLflow, TensorBoard, Weights & Biases); it reads the database and is used
by the CLI and, through a hook, by the worker.
"""
