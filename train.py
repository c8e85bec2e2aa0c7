"""Train a registration network: ``python train.py [overrides]``, same as ``regnet-train``."""

from regnet.cli.train import main

if __name__ == "__main__":
    main()
