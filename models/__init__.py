"""Architectures, one file each, found by importlib from config.json's
model_type; models/layers/ holds the shared layers they are built from."""
