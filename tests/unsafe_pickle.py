"""A checkpoint whose unpickling runs code: the object below is rebuilt by calling
``open(marker, "w")``, so the marker file exists exactly when the payload ran."""

from __future__ import annotations

from pathlib import Path

import torch


class CreatesFile:
    """Pickles as the call ``open(marker, "w")``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def write_malicious_checkpoint(path: Path, marker: Path) -> Path:
    """A ``.ckpt`` shaped like a regnet checkpoint, with the payload among its entries."""
    torch.save(
        {
            "state_dict": {"model.weight": torch.zeros(2)},
            "hyper_parameters": {"config": {"model": {"_target_": "regnet.nets.VoxelMorph"}}},
            "regnet_version": "0.1.0",
            "payload": CreatesFile(marker),
        },
        path,
    )
    return path
