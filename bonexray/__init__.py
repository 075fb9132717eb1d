"""bonexray: batch classification of musculoskeletal radiograph studies."""

__version__ = "0.1.0"
