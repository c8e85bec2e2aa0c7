"""Command-line entry points (``regnet-train`` ...), each a thin Hydra wrapper over the library."""
