"""megadoc_pl.model: the Llama (``llama.py``, config in ``config.py``) and its Hugging Face weight
mapping (``hf.py``). It imports nothing from the layers above it (data, demo, synth, train, eval,
analysis): checkpoint files, run directories and exports are ``megadoc_pl/checkpoints.py``."""
