"""LiveTalk: real-time, audio-driven avatar video diffusion toolkit."""

__version__ = "0.1.0"
