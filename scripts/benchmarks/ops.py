"""Speed and agreement of regnet's hot operations against MONAI, on the same tensors.

Compared (``run_ops_benchmark``):

* LNCC, window 9, forward + backward (gradient with respect to the warped image):
  :func:`regnet.losses.local_ncc` vs ``monai.losses.LocalNormalizedCrossCorrelationLoss(
  kernel_size=9, kernel_type="rectangular")``; agreement of the loss value and of the gradient.
* Backward warping, linear interpolation, border padding, forward and forward + backward
  (gradients with respect to the image and the field): :func:`regnet.spatial.warp` vs
  ``monai.networks.blocks.Warp``. Both take the DDF in voxels with components in tensor-axis
  order and map backward (``out(x) = image(x + ddf(x))``), so the same field goes to both.
  Warped images agree to float32 rounding. The field gradients differ only at the few sample
  points that lie within float32 rounding of a grid line, where the derivative of linear
  interpolation jumps and the two coordinate computations land on different sides (checked at
  96^3: 8 of 2.65M values differ by more than 1e-3, all within 8e-6 voxels of a grid line); the
  table counts them.
* The same warps of an image that needs no gradient (forward + backward, gradient to the field
  only), as the registration engine warps the moving image and its MIND-SSC descriptors: the
  image, and 12 smooth channels stored channels-last. There :func:`regnet.spatial.sample` gathers
  the voxels' channel rows (:mod:`regnet.spatial.gather`) instead of calling ``grid_sample``.
* Gaussian smoothing, sigma 1 voxel, replicate edges, forward + backward, of a 3-component field
  on a half-size grid (as the engine smooths an SVF's velocity every step):
  :func:`regnet.spatial.smooth.gaussian_smooth` (its backward pass a forward convolution) vs
  ``monai.networks.layers.separable_filtering`` with ``gaussian_1d(1, truncated=3,
  approx="erf")`` (autograd through the convolutions); agreement of the gradient.

* HD95 of label maps: :func:`regnet.metrics.hd95` vs ``monai.metrics.compute_hausdorff_distance(
  percentile=95)`` label by label (MONAI imported beforehand, so its 5.8 s import is not in the
  time); agreement of the distances.

Similarity costs (``run_similarity_benchmark``), regnet only: forward + backward (gradient with
respect to the warped image) of the loss terms ``lncc`` (windows 9 and 7; window 9 also with a
new fixed tensor per call, so that nothing of the fixed image is kept), ``mi`` and ``nmi``
(32 bins, every voxel, and ``samples=50000`` random voxels per call), and the regulariser
``grad`` of the DDF (gradient with respect to the field; its hand-written backward pass and
autograd's through the same sum), each as a multiple of ``lncc`` window 9 timed in the same
rounds. Sampled terms are seeded once, before the warm-up.

Timing: one warm-up call of each, then ``repeats`` rounds that alternate regnet and MONAI (or
all similarity terms), so they see the same machine load; the tables report medians in seconds.
Run ``python scripts/benchmarks/ops.py --shape 160,192,224`` (or ``scripts/benchmark.py ops``).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from monai.losses import LocalNormalizedCrossCorrelationLoss
from monai.networks.blocks import Warp
from monai.networks.layers import gaussian_1d, separable_filtering

from regnet.losses import (
    LNCC,
    MIND,
    Diffusion,
    LossTerm,
    MutualInformation,
    NormalizedMutualInformation,
    local_ncc,
)
from regnet.spatial import warp
from regnet.spatial.smooth import gaussian_smooth

LNCC_WINDOW = 9
MI_SAMPLES = 50_000
MAX_DISPLACEMENT = 4.0  # voxels
KINK_TOLERANCE = 1e-3
SEED = 0


def _smooth_random(shape: Sequence[int], channels: int, generator: torch.Generator) -> torch.Tensor:
    """Random field ``(1, channels, *shape)`` in ``[0, 1]``, smooth on a scale of ~8 voxels."""
    coarse = torch.rand(1, channels, *[max(2, n // 8) for n in shape], generator=generator)
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    return F.interpolate(coarse, size=tuple(shape), mode=mode, align_corners=True)


def make_inputs(shape: Sequence[int], device: str) -> dict[str, torch.Tensor]:
    """Fixed and moving images ``(1, 1, *shape)`` (smooth structure plus noise) and a smooth
    DDF ``(1, ndim, *shape)`` of up to ``MAX_DISPLACEMENT`` voxels, all float32."""
    generator = torch.Generator().manual_seed(SEED)
    ndim = len(shape)
    moving = _smooth_random(shape, 1, generator) + 0.1 * torch.rand(
        1, 1, *shape, generator=generator
    )
    fixed = 0.8 * moving + 0.2 * torch.rand(1, 1, *shape, generator=generator)
    ddf = (2.0 * _smooth_random(shape, ndim, generator) - 1.0) * MAX_DISPLACEMENT
    return {"fixed": fixed.to(device), "moving": moving.to(device), "ddf": ddf.to(device)}


def _timed(function: Callable[[], object], device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    function()
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _compare(
    name: str,
    ours: Callable[[], object],
    theirs: Callable[[], object],
    repeats: int,
    device: str,
) -> dict[str, float | str]:
    """Median seconds of two callables, alternated after one warm-up call each."""
    ours()
    theirs()
    times_ours, times_theirs = [], []
    for _ in range(repeats):
        times_ours.append(_timed(ours, device))
        times_theirs.append(_timed(theirs, device))
    ours_s, theirs_s = statistics.median(times_ours), statistics.median(times_theirs)
    return {
        "operation": name,
        "regnet s": ours_s,
        "MONAI s": theirs_s,
        "speed-up": theirs_s / ours_s,
    }


def _lncc_rows(inputs: dict[str, torch.Tensor], repeats: int, device: str) -> list[dict]:
    ndim = inputs["fixed"].dim() - 2
    fixed = inputs["fixed"]
    monai_lncc = LocalNormalizedCrossCorrelationLoss(
        spatial_dims=ndim, kernel_size=LNCC_WINDOW, kernel_type="rectangular"
    ).to(device)

    def run(loss_fn: Callable[[torch.Tensor], torch.Tensor]) -> tuple[float, torch.Tensor]:
        warped = inputs["moving"].clone().requires_grad_()
        value = loss_fn(warped)
        value.backward()
        return value.item(), warped.grad

    def ours():
        return run(lambda warped: local_ncc(fixed, warped, LNCC_WINDOW))

    def theirs():
        return run(lambda warped: monai_lncc(warped, fixed))

    (value_ours, grad_ours), (value_theirs, grad_theirs) = ours(), theirs()
    row = _compare(f"LNCC (window {LNCC_WINDOW}) forward+backward", ours, theirs, repeats, device)
    row["max abs diff"] = abs(value_ours - value_theirs)
    row["compared"] = (
        f"loss value ({value_ours:.6f}); gradient: {_max_diff(grad_ours, grad_theirs):.2g}"
    )
    return [row]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _warp_rows(inputs: dict[str, torch.Tensor], repeats: int, device: str) -> list[dict]:
    moving, ddf = inputs["moving"], inputs["ddf"]
    with warnings.catch_warnings():
        # MONAI warns on construction that it falls back to PyTorch's grid_sample.
        warnings.simplefilter("ignore", UserWarning)
        monai_warp = Warp(mode="bilinear", padding_mode="border")
    upstream = torch.rand(moving.shape, generator=torch.Generator().manual_seed(SEED + 1))
    upstream = upstream.to(device)

    def forward_ours():
        with torch.no_grad():
            return warp(moving, ddf)

    def forward_theirs():
        with torch.no_grad():
            return monai_warp(moving, ddf)

    def backward(warp_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        image = moving.clone().requires_grad_()
        field = ddf.clone().requires_grad_()
        (warp_fn(image, field) * upstream).sum().backward()
        return image.grad, field.grad

    def backward_ours():
        return backward(warp)

    def backward_theirs():
        return backward(monai_warp)

    forward_row = _compare(
        "warp (linear, border) forward", forward_ours, forward_theirs, repeats, device
    )
    forward_row["max abs diff"] = _max_diff(forward_ours(), forward_theirs())
    forward_row["compared"] = "warped image"
    (image_ours, field_ours), (image_theirs, field_theirs) = backward_ours(), backward_theirs()
    backward_row = _compare(
        "warp (linear, border) forward+backward", backward_ours, backward_theirs, repeats, device
    )
    backward_row["max abs diff"] = _max_diff(field_ours, field_theirs)
    kinks = int(((field_ours - field_theirs).abs() > KINK_TOLERANCE).sum())
    backward_row["compared"] = (
        f"ddf gradient ({kinks} of {field_ours.numel()} values differ by > {KINK_TOLERANCE:g}); "
        f"image gradient: {_max_diff(image_ours, image_theirs):.2g}"
    )
    return [forward_row, backward_row] + _constant_image_rows(inputs, monai_warp, repeats, device)


def _constant_image_rows(inputs, monai_warp, repeats: int, device: str) -> list[dict]:
    """Warps whose image needs no gradient, forward + backward (gradient to the field only), as
    the registration engine warps the moving image and its MIND descriptors: the image, and 12
    smooth channels stored channels-last (as :class:`regnet.optimize.sampled.SampledMIND` keeps
    its descriptors)."""
    ddf = inputs["ddf"]
    generator = torch.Generator().manual_seed(SEED + 3)
    descriptors = _smooth_random(ddf.shape[2:], 12, generator).to(device)
    if ddf.dim() == 5:
        descriptors = descriptors.contiguous(memory_format=torch.channels_last_3d)
    rows = []
    for name, image in (("1 channel", inputs["moving"]), ("12 channels", descriptors)):
        upstream = torch.rand(image.shape, generator=generator).to(device)

        def backward(warp_fn, image=image, upstream=upstream):
            field = ddf.clone().requires_grad_()
            (warp_fn(image, field) * upstream).sum().backward()
            return field.grad

        def ours(backward=backward):
            return backward(warp)

        def theirs(backward=backward):
            return backward(monai_warp)

        row = _compare(
            f"warp (linear, border) of a constant image, {name}, forward+backward (field)",
            ours,
            theirs,
            repeats,
            device,
        )
        grad_ours, grad_theirs = ours(), theirs()
        kinks = int(((grad_ours - grad_theirs).abs() > KINK_TOLERANCE).sum())
        row["max abs diff"] = _max_diff(grad_ours, grad_theirs)
        row["compared"] = (
            f"ddf gradient ({kinks} of {grad_ours.numel()} values differ by > {KINK_TOLERANCE:g})"
        )
        rows.append(row)
    return rows


def _smooth_rows(inputs: dict[str, torch.Tensor], repeats: int, device: str) -> list[dict]:
    """Gaussian smoothing (sigma 1 voxel, replicate edges) of the DDF on a half-size grid, as
    the engine smooths an SVF's velocity: forward + backward."""
    field = F.interpolate(
        inputs["ddf"],
        size=[max(2, n // 2) for n in inputs["ddf"].shape[2:]],
        mode="bilinear" if inputs["ddf"].dim() == 4 else "trilinear",
        align_corners=True,
    )
    upstream = torch.rand(field.shape, generator=torch.Generator().manual_seed(SEED + 2))
    upstream = upstream.to(device)
    kernel = gaussian_1d(torch.tensor(1.0), truncated=3.0, approx="erf", normalize=True)
    kernels = [kernel.to(device)] * (field.dim() - 2)

    def backward(smooth: Callable[[torch.Tensor], torch.Tensor]) -> tuple:
        x = field.clone().requires_grad_()
        out = smooth(x)
        (out * upstream).sum().backward()
        return out.detach(), x.grad

    def ours():
        return backward(lambda x: gaussian_smooth(x, 1.0))

    def theirs():
        return backward(lambda x: separable_filtering(x, kernels, mode="replicate"))

    row = _compare("Gaussian smoothing forward+backward", ours, theirs, repeats, device)
    (out_ours, grad_ours), (out_theirs, grad_theirs) = ours(), theirs()
    row["max abs diff"] = _max_diff(grad_ours, grad_theirs)
    row["compared"] = f"gradient; smoothed field: {_max_diff(out_ours, out_theirs):.2g}"
    return [row]


HD95_LABELS = 8


def _hd95_rows(shape: Sequence[int], repeats: int) -> list[dict]:
    """HD95 of ``HD95_LABELS`` labels (blocky regions, one map shifted by a voxel against the
    other, 1.5 mm voxels along the first axis): :func:`regnet.metrics.hd95` against MONAI's
    ``compute_hausdorff_distance(percentile=95)`` per label, MONAI imported beforehand."""
    from monai.metrics import compute_hausdorff_distance

    from regnet.metrics import hd95

    generator = torch.Generator().manual_seed(SEED + 4)
    coarse = torch.randint(
        1, HD95_LABELS + 1, [max(2, n // 16) for n in shape], generator=generator
    ).float()
    true = F.interpolate(coarse[None, None], size=tuple(shape), mode="nearest")[0, 0].long()
    pred = torch.cat([true[:1], true[:-1]])  # shifted by one voxel along the first axis
    spacing = (1.5,) + (1.0,) * (len(shape) - 1)
    labels = sorted(set(true.unique().tolist()) & set(pred.unique().tolist()))

    def ours():
        return hd95(pred.numpy(), true.numpy(), spacing, labels)

    def theirs():
        with warnings.catch_warnings():  # MONAI warns about an argument it passes itself
            warnings.simplefilter("ignore", FutureWarning)
            return _monai_hd95()

    def _monai_hd95():
        return {
            label: float(
                compute_hausdorff_distance(
                    (pred == label)[None, None],
                    (true == label)[None, None],
                    percentile=95,
                    spacing=spacing,
                )
            )
            for label in labels
        }

    row = _compare(f"HD95 of {HD95_LABELS} labels", ours, theirs, repeats, "cpu")
    values_ours, values_theirs = ours(), theirs()
    row["max abs diff"] = max(abs(values_ours[k] - values_theirs[k]) for k in labels)
    row["compared"] = f"HD95 per label (mm; largest {max(values_ours.values()):.3g})"
    return [row]


def run_ops_benchmark(
    shape: Sequence[int] = (160, 192, 224), repeats: int = 5, device: str = "cpu"
) -> list[dict]:
    """Time regnet's LNCC and warp against MONAI's on the same tensors of spatial ``shape``.

    Returns one row per operation: ``operation``, median ``regnet s`` and ``MONAI s``,
    ``speed-up`` (MONAI / regnet), ``max abs diff`` of the quantity named in ``compared``.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) not in (2, 3) or min(shape) < 2:
        raise ValueError(f"shape must hold 2 or 3 sizes >= 2, got {shape}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    inputs = make_inputs(shape, device)
    rows = _lncc_rows(inputs, repeats, device) + _warp_rows(inputs, repeats, device)
    return rows + _smooth_rows(inputs, repeats, device) + _hd95_rows(shape, repeats)


class AutogradDiffusion(LossTerm):
    """The ``l2`` value of :class:`regnet.losses.Diffusion` differentiated by autograd: what
    its hand-written backward pass is timed against."""

    requires = ("ddf",)

    def forward(self, inputs):
        ddf = inputs["ddf"]
        ndim = ddf.shape[1]
        return sum((torch.diff(ddf, dim=axis) ** 2).mean() for axis in range(2, 2 + ndim)) / ndim


def similarity_terms(samples: int = MI_SAMPLES) -> dict[str, LossTerm]:
    """The loss terms timed by :func:`run_similarity_benchmark`, by row name."""
    return {
        f"lncc (window {LNCC_WINDOW})": LNCC(window=LNCC_WINDOW),
        f"lncc (window {LNCC_WINDOW}), fixed statistics recomputed": LNCC(window=LNCC_WINDOW),
        "lncc (window 7)": LNCC(window=7),
        "mi (32 bins, all voxels)": MutualInformation(),
        "nmi (32 bins, all voxels)": NormalizedMutualInformation(),
        f"mi (32 bins, samples={samples})": MutualInformation(samples=samples),
        f"nmi (32 bins, samples={samples})": NormalizedMutualInformation(samples=samples),
        "mind (radius 1, dilation 2; fixed descriptors cached)": MIND(),
        "grad of the DDF, hand-written backward": Diffusion(),
        "grad of the DDF, through autograd": AutogradDiffusion(),
    }


def run_similarity_benchmark(
    shape: Sequence[int] = (160, 192, 224),
    repeats: int = 5,
    device: str = "cpu",
    samples: int = MI_SAMPLES,
) -> list[dict]:
    """Forward + backward seconds of the similarity terms on the same ``fixed``/``moving`` (and
    of ``grad`` on the same ``ddf``).

    Returns one row per term: ``operation``, median ``seconds``, ``x lncc 9`` (its median over
    that of ``lncc`` window 9, timed in the same rounds) and the ``loss`` value.
    """
    inputs = make_inputs(tuple(int(n) for n in shape), device)
    terms = similarity_terms(samples)
    torch.manual_seed(SEED)

    def call(name: str, term: LossTerm) -> Callable[[], float]:
        recompute = name.endswith("recomputed")

        def run() -> float:
            if term.requires == ("ddf",):
                value = term({"ddf": inputs["ddf"].clone().requires_grad_()})
            else:
                warped = inputs["moving"].clone().requires_grad_()
                # a new fixed tensor per call: nothing kept from the last call (regnet.losses.LNCC)
                fixed = inputs["fixed"].clone() if recompute else inputs["fixed"]
                value = term({"fixed": fixed, "warped": warped})
            value.backward()
            return value.item()

        return run

    runs = {name: call(name, term) for name, term in terms.items()}
    values = {name: run() for name, run in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(_timed(run, device))
    medians = {name: statistics.median(t) for name, t in times.items()}
    reference = medians[f"lncc (window {LNCC_WINDOW})"]
    return [
        {
            "operation": f"{name} forward+backward",
            "seconds": medians[name],
            f"x lncc {LNCC_WINDOW}": medians[name] / reference,
            "loss": values[name],
        }
        for name in runs
    ]


def format_table(rows: Sequence[dict]) -> str:
    """Rows of :func:`run_ops_benchmark` or :func:`run_similarity_benchmark` as Markdown."""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
    for row in rows:
        cells = [f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="160,192,224", help="spatial size, e.g. 160,192,224")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after warm-up")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:n]")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--table",
        choices=("both", "monai", "similarity"),
        default="both",
        help="comparison against MONAI, similarity costs, or both",
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    try:
        shape = tuple(int(n) for n in args.shape.replace("x", ",").split(","))
    except ValueError:
        parser.error(f"--shape: expected sizes like 160,192,224, got {args.shape!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine")
    print(
        f"Shape {'x'.join(map(str, shape))}, device {args.device}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}"
    )
    if args.table in ("both", "monai"):
        print("\n" + format_table(run_ops_benchmark(shape, args.repeats, args.device)))
    if args.table in ("both", "similarity"):
        print("\n" + format_table(run_similarity_benchmark(shape, args.repeats, args.device)))


if __name__ == "__main__":
    main()
