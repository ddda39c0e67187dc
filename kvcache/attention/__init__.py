"""Attention over the paged pools, one backend a file (portable, cpu, cuda),
behind one per-step metadata builder (metadata.py, used by the model runner)."""
