"""criu-py: checkpoint/restore of Linux processes with CRIU-compatible images."""
__version__ = "0.1.0"
