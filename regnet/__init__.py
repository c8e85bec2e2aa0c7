"""regnet: deep-learning and classical medical image registration in PyTorch.

Layout follows the data: ``regnet.data`` -> ``regnet.nets`` -> ``regnet.spatial`` ->
``regnet.losses`` -> ``regnet.module`` -> ``regnet.cli``. The spatial code knows nothing of
networks or Lightning. Coordinate conventions are stated once, in ``regnet.spatial``.
"""

__version__ = "0.1.0"
