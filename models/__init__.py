"""One file per architecture, found by importlib from config.json's model_type."""

import engine  # noqa: F401  (preloads the BLAS before mlx is imported)
