"""Held-out evaluation of trained SAEs: stage.py (metrics.json), splice.py (SAEs spliced into the
language model: the public spliced/run_with_latents, CE loss recovered, KL) and sequences.py (the
held-out text)."""
