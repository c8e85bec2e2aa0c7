"""Evaluate registration methods over a pair list or a Learn2Reg split: ``python evaluate.py
methods=[ckpt:PATH,identity] pairs=list.csv``, same as ``regnet-evaluate``."""

from regnet.cli.evaluate import main

if __name__ == "__main__":
    main()
