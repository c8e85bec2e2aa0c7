import pickle

import pytest
import torch
from omegaconf import OmegaConf
from unsafe_pickle import CreatesFile, write_malicious_checkpoint

from regnet.checkpoint import plain_container, read_checkpoint
from regnet.data.io import DataError


def test_payload_runs_when_unpickled_without_restriction(tmp_path):
    """The test payload is real: an unrestricted load creates the marker."""
    marker = tmp_path / "ran"
    path = write_malicious_checkpoint(tmp_path / "bad.ckpt", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_code_carrying_checkpoint_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "ran"
    path = write_malicious_checkpoint(tmp_path / "bad.ckpt", marker)
    with pytest.raises(DataError) as error:
        read_checkpoint(path)
    message = str(error.value)
    assert message.startswith(f"{path}: refused: reading it would run code")
    assert "asks for io.open" in message and "\n" not in message
    assert not marker.exists()


def test_plain_pickle_with_payload_is_refused(tmp_path):
    """A bare pickle (not torch.save's zip) is read by the same restricted unpickler."""
    marker = tmp_path / "ran"
    path = tmp_path / "bad.ckpt"
    path.write_bytes(pickle.dumps({"payload": CreatesFile(marker)}, protocol=2))
    with pytest.raises(DataError, match="refused: reading it would run code"):
        read_checkpoint(path)
    # protocol 4 frames stop the restricted reader even before the payload's global
    path.write_bytes(pickle.dumps({"payload": CreatesFile(marker)}, protocol=4))
    with pytest.raises(DataError, match="refused: not readable without arbitrary unpickling"):
        read_checkpoint(path)
    assert not marker.exists()


def test_plain_checkpoint_reads_and_other_files_fail_in_one_line(tmp_path):
    path = tmp_path / "ok.ckpt"
    torch.save({"state_dict": {"w": torch.ones(3)}, "hyper_parameters": {"lr": 0.1}}, path)
    checkpoint = read_checkpoint(path)
    torch.testing.assert_close(checkpoint["state_dict"]["w"], torch.ones(3))
    with pytest.raises(DataError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "missing.ckpt")
    (tmp_path / "text.ckpt").write_text("not a checkpoint\n")
    with pytest.raises(DataError, match=r"not a PyTorch checkpoint \(UnpicklingError\)"):
        read_checkpoint(tmp_path / "text.ckpt")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(DataError, match=r"not a PyTorch checkpoint \(EOFError\)"):
        read_checkpoint(tmp_path / "empty.ckpt")
    torch.save([torch.ones(1)], tmp_path / "list.ckpt")
    with pytest.raises(DataError, match=r"not a checkpoint \(holds a list\)"):
        read_checkpoint(tmp_path / "list.ckpt")


def test_plain_container_turns_omegaconf_into_builtin_types():
    config = OmegaConf.create({"a": {"b": [1, 2.5, "x"]}, "c": "${a.b}", "d": None})
    plain = plain_container(config)
    assert plain == {"a": {"b": [1, 2.5, "x"]}, "c": [1, 2.5, "x"], "d": None}
    assert type(plain) is dict and type(plain["a"]["b"]) is list
    assert plain_container((1, "two")) == [1, "two"]
    assert plain_container("text") == "text"
