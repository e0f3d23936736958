"""The run machinery: stages (``stage.py``: what a stage is), the runner that runs or skips them into one folder
(``runner.py``), the manifest that records them (``manifest.py``), code fingerprints (``fingerprint.py``),
and model checkpoints (``checkpoints.py``)."""
