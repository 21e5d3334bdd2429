"""After train: what each latent means, read from the store's own rows (`saeflow features`).

stage.py (the command: features.json and index.html per SAE variant), scan.py (the one
streaming pass), stats.py with bottom_n.py (bounded-memory per-latent statistics: frequency,
mean/max, histogram, top-N and quantile-interval examples), context.py (an example's LM window
and neighbouring rows), examples.py (context activations, token texts, `top_examples`),
logits.py (decoder direction @ W_U), report.py (features.json, docs/features.md) and
dashboard.py with dashboard.html (the page).
"""
