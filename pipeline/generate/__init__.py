"""Stage 1: text -> language model -> the activation store.

lm.py loads the model (TransformerBridge: MiniLM, seeded random decoders, local or hub models);
text.py and docstrings.py give the documents; windows.py cuts them into batches of windows;
stage.py runs the forward pass and hands the rows to the store writer; provenance.py says what
the store records and whether an existing store belongs to the config.
"""
