"""Held-out evaluation of trained SAEs: stage.py (metrics.json), splice.py (the SAE spliced
into the language model: CE loss recovered, KL) and sequences.py (the held-out text)."""
