"""windtunnel: model wind tunnels for LM pretraining (μP proxies, WSD branches, scaling laws)."""

__version__ = "0.1.0"
