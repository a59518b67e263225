"""Captions images in Cloud Storage with Gemini and stores them as object metadata."""

__version__ = "0.1.0"
