"""divingbell: declarative host configuration for bare-metal Kubernetes nodes."""

__version__ = "0.1.0"
