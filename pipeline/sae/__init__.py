"""The sparse autoencoder both stages share.

config.py (SAEConfig, InitializerConfig), model.py (SparseAutoencoder), activation_fns.py (the
act_fn table, JumpReLU, BatchTopK), sparse_topk.py (the O(B*k*d) TopK path), initialize.py with
geometry.py (geometric median, PCA), io.py (safetensors save/load, SAELens export) and
metrics.py (the reconstruction metrics accumulator).
"""
