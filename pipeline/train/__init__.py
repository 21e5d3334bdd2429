"""Stage 2: the activation store -> trained SAEs.

stage.py is the loop (one pass of the loader feeds every sweep variant) and resume; trainer.py
is one SAE's optimizer step, losses.py and schedules.py its terms and schedules; checkpoint.py,
trackers.py and report.py what a run writes besides the SAE.
"""
