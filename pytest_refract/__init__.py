"""pytest-refract: KV-cache quantization quality as CI-gated pytest regression tests."""

__version__ = "0.1.0"
