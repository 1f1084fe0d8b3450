"""Interpretability of trained runs (scripts/explain.py,
docs/interpretability.md).

  forward.py               the Transformer families' forward pass from input
                           embeddings, one block at a time, keeping each
                           layer's q and k (the model's own modules)
  attention_maps.py        attention probabilities per layer and head,
                           recomputed from those q and k (training never
                           materializes them)
  integrated_gradients.py  integrated gradients on any f(batch) -> scores,
                           with its quadrature rules and completeness gap
  targets.py               what is attributed, per family: an LM's next-token
                           log-prob, a classifier's class logit
  render.py                the PNGs and the HTML
  report.py                a run directory + a request -> checked, computed,
                           written (what the script runs)

Sits above lm/run: it restores runs with lm.run.restore.
"""
