"""Register image files with a trained network: ``python predict.py ckpt=PATH pair=[f,m]``,
same as ``regnet-predict``."""

from regnet.cli.predict import main

if __name__ == "__main__":
    main()
