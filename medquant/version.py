"""The medquant version, in a leaf module so that every layer can record it (saved checkpoints carry it)."""

__version__ = "0.1.0"
