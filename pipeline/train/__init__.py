"""The training library: data (``data.py``), the experiment set-up every stage shares (``setup.py``), one training
step and epoch (``loop.py``), the adversarial-training recipe and its epoch loop used by every training stage
(``recipe.py``), mid-stage checkpoints (``resume.py``), the sparsifier built from the config (``sparsify.py``) and
torchrun (``distributed.py``)."""
