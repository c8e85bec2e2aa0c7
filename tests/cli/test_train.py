import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from unsafe_pickle import write_malicious_checkpoint

from regnet.cli.config import CONFIG_DIR_ENV, config_dir
from regnet.cli.train import train
from regnet.losses import DEFAULT_WEIGHTS
from regnet.visualize import make_panel

REPO = Path(__file__).resolve().parents[2]


def compose_train(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(
            "train",
            overrides=["experiment=debug", f"paths.output_dir={tmp_path}", *overrides],
        )


def panel_images(run_dir: Path) -> list:
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    return events.Images("val/panel") if "val/panel" in events.Tags()["images"] else []


def panel_size(shape: tuple[int, ...]) -> tuple[int, int]:
    """(height, width) of the overview panel of images of this spatial shape, no affine."""
    image = torch.zeros(1, *shape)
    panel = make_panel(image, image, image, torch.zeros(len(shape), *shape))
    return tuple(panel.image.shape[1:])


def run_cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_config_dir_override(tmp_path, monkeypatch):
    monkeypatch.setenv(CONFIG_DIR_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="has no train.yaml"):
        config_dir()
    (tmp_path / "train.yaml").write_text("task_name: x\n")
    assert config_dir() == tmp_path.resolve()
    monkeypatch.delenv(CONFIG_DIR_ENV)
    assert config_dir() == REPO / "configs"


def test_loss_weights_list_every_registered_term(tmp_path):
    cfg = compose_train(tmp_path, "loss_weights.grad=0.5")
    weights = OmegaConf.to_container(cfg.loss_weights)
    assert weights == {**DEFAULT_WEIGHTS, "grad": 0.5}
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        plain = compose("train", overrides=[f"paths.output_dir={tmp_path}"])
    assert OmegaConf.to_container(plain.loss_weights) == DEFAULT_WEIGHTS


class TrainMetrics(Callback):
    """Keeps the metrics logged by the last training step (the final validation replaces them)."""

    def on_train_end(self, trainer, pl_module):
        self.metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}


# Every model and every supervision mode (unsupervised, weakly supervised, supervised, mixed).
RUNS = [
    ("voxelmorph", "ncc+grad"),
    ("voxelmorph_diff", "dice+grad"),
    ("affine", "ddf"),
    ("bspline", "lncc+bending+dice+ddf"),
    ("affine_voxelmorph", "mi+grad"),
]


@pytest.mark.parametrize(("model", "loss"), RUNS, ids=["-".join(run) for run in RUNS])
def test_every_model_and_supervision_trains(tmp_path, model, loss):
    weights = {"grad": 0.5, "bending": 2.0, "dice": 3.0}
    overrides = [f"loss_weights.{name}={w}" for name, w in weights.items()]
    logged = TrainMetrics()
    trainer = train(compose_train(tmp_path, f"model={model}", f"loss={loss}", *overrides), [logged])
    assert trainer.global_step == 5
    # the command-line weights reach the loss: total = sum of weight * unweighted term
    expected = sum(
        weights.get(name, DEFAULT_WEIGHTS[name]) * logged.metrics[f"train/loss_{name}"]
        for name in loss.split("+")
    )
    assert logged.metrics["train/loss"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    metrics = trainer.callback_metrics  # final validation of the best checkpoint
    assert 0.0 <= float(metrics["val/dice"]) <= 1.0
    assert 0.0 <= float(metrics["val/folding_percent"]) <= 100.0
    assert math.isfinite(float(metrics["val/loss"]))
    best = Path(trainer.checkpoint_callback.best_model_path)
    assert best.parent == tmp_path / "checkpoints" and best.is_file()
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    checkpoint = torch.load(best, map_location="cpu", weights_only=True)
    assert checkpoint["hyper_parameters"]["config"]["model"]["ndim"] == 2
    assert checkpoint["hyper_parameters"]["config"]["loss"] == loss
    assert "regnet_version" in checkpoint


def test_3d_run_draws_three_plane_panel(tmp_path):
    trainer = train(compose_train(tmp_path, "experiment=debug3d", "model=voxelmorph_diff"))
    assert trainer.global_step == 5
    (image,) = panel_images(tmp_path)
    assert (image.height, image.width) == panel_size((16, 16, 16))


class StartState(Callback):
    """Records the step counter and optimiser state when training (re)starts."""

    def on_train_start(self, trainer, pl_module):
        self.step = trainer.global_step
        self.optimizer = copy.deepcopy(trainer.optimizers[0].state_dict())
        self.weights = copy.deepcopy(pl_module.state_dict())


def test_resume_restores_step_and_optimizer(tmp_path):
    # one epoch of 3 steps, then resume for a second epoch
    epoch = ["data.train.length=6", "trainer.max_steps=-1"]
    first = train(compose_train(tmp_path / "a", *epoch, "trainer.max_epochs=1"))
    assert first.global_step == 3
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)["optimizer_states"][0]

    start = StartState()
    resumed = train(
        compose_train(tmp_path / "b", *epoch, "trainer.max_epochs=2", f"ckpt_path={last}"),
        [start],
    )
    assert start.step == 3
    assert resumed.global_step == 6
    state = start.optimizer["state"]
    assert state.keys() == saved["state"].keys()
    for key, param_state in saved["state"].items():
        assert float(state[key]["step"]) == float(param_state["step"]) == 3
        torch.testing.assert_close(state[key]["exp_avg"], param_state["exp_avg"])
        torch.testing.assert_close(state[key]["exp_avg_sq"], param_state["exp_avg_sq"])


def test_resume_from_a_checkpoint_carrying_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    sent = write_malicious_checkpoint(tmp_path / "sent.ckpt", marker)
    run_dir = tmp_path / "run"
    result = run_cli("experiment=debug", f"ckpt_path={sent}", f"hydra.run.dir={run_dir}")
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {sent}: refused: reading it would run code")
    assert result.stderr.count("\n") == 1
    assert not marker.exists()
    assert not (run_dir / "config.yaml").exists() and not (run_dir / "checkpoints").exists()


def test_init_weights_start_a_new_run_from_a_checkpoints_network(tmp_path):
    first = train(compose_train(tmp_path / "a", "data.train.length=3", "trainer.max_steps=3"))
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    start = StartState()
    second = train(
        compose_train(
            tmp_path / "b", "data.train.length=3", "trainer.max_steps=2", f"init_weights={last}"
        ),
        [start],
    )
    assert first.global_step > 0 and start.step == 0 and second.global_step > 0
    assert start.optimizer["state"] == {}  # a fresh optimiser
    for name, value in saved.items():  # the weights it started from
        torch.testing.assert_close(start.weights[name], value)


def test_init_weights_that_do_not_fit_fail_in_one_line_before_writing(tmp_path):
    train(compose_train(tmp_path / "a", "data.train.length=3", "trainer.max_steps=1"))
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    run_dir = tmp_path / "run"
    result = run_cli(
        "experiment=debug",
        "model.enc_channels=[4,8]",
        f"init_weights={last}",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {last}: init_weights do not fit the configured model")
    assert result.stderr.count("\n") == 1
    assert not (run_dir / "config.yaml").exists()
    both = run_cli("experiment=debug", f"init_weights={last}", f"ckpt_path={last}")
    assert both.returncode == 2 and "not both" in both.stderr


def test_last_checkpoint_holds_the_final_step(tmp_path):
    """last.ckpt is the latest state (for resuming), also after a partial last epoch and when
    the best checkpoint is an earlier one."""
    trainer = train(
        compose_train(
            tmp_path, "data.train.length=6", "trainer.max_steps=4", "trainer.max_epochs=5"
        )
    )
    assert trainer.global_step == 4
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 4
    best = sorted((tmp_path / "checkpoints").glob("best-*.ckpt"))
    assert len(best) == 1


def test_command_line_run_writes_one_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("loss=lncc+bending+dice", "experiment=debug", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Run directory: {run_dir}" in result.stdout
    config = OmegaConf.load(run_dir / "config.yaml")
    assert config.loss == "lncc+bending+dice"
    assert config.paths.output_dir == str(run_dir)
    assert config.model.ndim == 2
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    (image,) = panel_images(run_dir)
    assert (image.height, image.width) == panel_size((32, 32))


def write_unlabelled_folder(root: Path, count: int = 3, size: int = 16) -> None:
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        image = nib.Nifti1Image(rng.random((size, size)).astype(np.float32), np.eye(4))
        nib.save(image, root / "images" / f"subject{index}.nii.gz")


def test_loss_term_without_its_input_fails_clearly(tmp_path):
    write_unlabelled_folder(tmp_path / "data")
    search = tmp_path / "configs"
    (search / "data").mkdir(parents=True)
    folder = {"_target_": "regnet.data.layouts.FolderDataset", "root": str(tmp_path / "data")}
    folder.update(labels=None, ndim=2, num_val=1, percentiles=None)
    data = {
        "_target_": "regnet.data.RegistrationDataModule",
        "ndim": 2,
        "num_labels": 4,
        "in_channels": 1,
        "batch_size": 1,
        "train": {**folder, "split": "train"},
        "val": {**folder, "split": "all", "num_pairs": 1},
    }
    OmegaConf.save(OmegaConf.create(data), search / "data" / "unlabelled.yaml")
    result = run_cli(
        "data=unlabelled",
        "loss=dice+grad",
        f"hydra.searchpath=[file://{search}]",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "loss term 'dice' needs inputs fixed_label, warped_label" in output
    assert "moving_label" in output
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


def test_ddp_on_two_cpu_processes(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(
        "experiment=debug",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.max_steps=2",
        f"hydra.run.dir={run_dir}",
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "distributed_backend=gloo" in output
    assert "Starting with 2 processes" in output
    checkpoint = torch.load(
        run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert checkpoint["global_step"] == 2


@pytest.mark.parametrize(
    "experiment", sorted(p.stem for p in (Path(config_dir()) / "experiment").glob("*.yaml"))
)
def test_every_experiment_config_builds_its_module(tmp_path, experiment):
    from regnet.cli.train import build_module

    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        cfg = compose(
            "train", overrides=[f"experiment={experiment}", f"paths.output_dir={tmp_path}"]
        )
    module = build_module(cfg)
    assert module.hparams.loss == cfg.loss
    assert module.hparams.label_downsize == cfg.label_downsize
