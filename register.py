"""Register two images by gradient descent: ``python register.py fixed=F moving=M``, same as
``regnet-register``."""

from regnet.cli.register import main

if __name__ == "__main__":
    main()
