"""The paper's augmentation as DALI graph pieces, plus the pure math behind them.

Training (Simonyan & Zisserman, sec. 3.1): isotropic rescale so the shorter side is S (fixed, or
uniform per image in [Smin, Smax]) -> one random crop -> random horizontal flip -> AlexNet's PCA
colour shift -> subtract the training mean RGB. The last three are one fused DALI kernel
(``crop_mirror_normalize``): the colour shift is a per-image constant, so ``x + shift - mean`` is
``x - (mean - shift)`` with a per-image "mean" argument.

Colour-shift units. dataset.json's ``rgb_eigval`` are eigenvalues of the RGB *covariance* on the 0-255
scale, i.e. pixel^2. AlexNet writes the shift as ``sum_i alpha_i lambda_i p_i``; taken literally with
variances in pixel^2 this is ~0.1 * 9000 = 900 grey levels on ImageNet, which is nonsense. We use the
standard deviation along each principal axis, ``sum_i alpha_i sqrt(lambda_i) p_i`` with
``alpha_i ~ N(0, color_shift_std)``: the shift is 10 % of the natural colour spread along each axis
(~10 levels along the first axis on ImageNet; the widely copied constants 0.2175*255 = 55 give ~6).
"""
from __future__ import annotations

import numpy as np

from storage.dataset import Stats

# nvJPEG buffer preallocation (bytes), from DALI's ResNet-50 example: enough for most ImageNet JPEGs
# without reallocation during the first epoch.
DEVICE_MEMORY_PADDING = 211_025_920
HOST_MEMORY_PADDING = 140_544_512

LAYOUTS = {"NCHW": "CHW", "NHWC": "HWC"}
DTYPES = ("float32", "bfloat16", "float16")
DECODES = ("mixed", "cpu")          # data.decode: nvJPEG on the GPU, or libjpeg-turbo on the CPU


# --- pure math (unit-tested without DALI) --------------------------------------------------------

def pca_matrix(stats: Stats, std: float) -> np.ndarray:
    """(3, 3) matrix M with ``shift = M @ z``, z ~ N(0, I): column i is ``std * sqrt(lambda_i) * p_i``."""
    val = np.sqrt(np.asarray(stats.eigval, dtype=np.float64))
    vec = np.asarray(stats.eigvec, dtype=np.float64)        # (3 axes, 3 channels)
    return (std * vec * val[:, None]).T                      # (3 channels, 3 axes)


def mean_rgb(stats: Stats, subtract: bool) -> np.ndarray:
    """The (3,) vector subtracted from every pixel: dataset.json's training mean, or zeros."""
    return np.asarray(stats.mean_rgb if subtract else (0.0, 0.0, 0.0), dtype=np.float32)


def scale_values(scale_min: int, scale_max: int) -> list[float]:
    """The integer shorter-side lengths S is drawn from, uniformly: Smin, Smin+1, ..., Smax."""
    if not 0 < scale_min <= scale_max:
        raise ValueError(f"need 0 < scale_min <= scale_max, got {scale_min}, {scale_max}")
    return [float(s) for s in range(scale_min, scale_max + 1)]


def check_layout_dtype(layout: str, dtype: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"Invalid layout {layout!r}. Only {', '.join(LAYOUTS)} are supported.")
    if dtype not in DTYPES:
        raise ValueError(f"Invalid dtype {dtype!r}. Only {', '.join(DTYPES)} are supported.")


# --- DALI graph pieces (call inside a ``with pipe:`` block) ---------------------------------------

def decode(jpegs, backend: str, hw_decoder_load: float = 1.0):
    """RGB uint8 HWC images. ``backend``: "mixed" (nvJPEG on the GPU; output on the GPU),
    "cpu" (libjpeg-turbo; stays on the CPU, for CPU-only pipelines), "cpu-gpu" (decode on the CPU,
    then move to the GPU for the resize and normalisation)."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    if backend == "mixed":
        return fn.decoders.image(jpegs, device="mixed", output_type=types.RGB, hw_decoder_load=hw_decoder_load,
                                 device_memory_padding=DEVICE_MEMORY_PADDING,
                                 host_memory_padding=HOST_MEMORY_PADDING)
    images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
    if backend == "cpu-gpu":
        return images.gpu()
    if backend != "cpu":
        raise ValueError(f"Invalid decode backend {backend!r}. Only mixed, cpu and cpu-gpu are supported.")
    return images


def rescale(images, shorter):
    """Isotropic rescale so the shorter side is ``shorter`` (a number, or a per-image DALI node).
    Linear interpolation, antialiased when shrinking."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    return fn.resize(images, resize_shorter=shorter, interp_type=types.INTERP_LINEAR, antialias=True)


def random_scale(scale_min: int, scale_max: int):
    """S per image: the constant when fixed, else uniform over the integers in [Smin, Smax]."""
    import nvidia.dali.fn as fn

    if scale_min == scale_max:
        return float(scale_min)
    return fn.random.uniform(values=scale_values(scale_min, scale_max))


def color_shift_mean(stats: Stats, std: float, subtract_mean: bool):
    """What crop_mirror_normalize subtracts: ``mean - shift``, a per-image (3,) node when the colour
    shift is on (std > 0), else the constant mean (or zeros)."""
    import nvidia.dali.fn as fn

    mean = mean_rgb(stats, subtract_mean)
    if std <= 0:
        return mean.tolist()
    z = fn.random.normal(shape=[1, 3])                      # (1 point, 3 coords), N(0, 1)
    # coord_transform computes M' z + T per point: -(M z) + mean = mean - shift
    m = fn.coord_transform(z, M=(-pca_matrix(stats, std)).astype(np.float32).flatten().tolist(),
                           T=mean.tolist())
    return fn.reshape(m, shape=[3])


def normalize(images, *, mean, crop: int | None = None, crop_pos=(0.5, 0.5), mirror=0,
              layout: str = "NCHW", dtype: str = "float32"):
    """(Optional crop) + (optional mirror) + subtract ``mean`` + layout + dtype, one fused kernel.
    bfloat16 is produced as float16 here (DALI has no bf16) and converted by the torch iterator:
    mean-subtracted pixels (|x| < 512) lose nothing in fp16 that bf16 would keep."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    check_layout_dtype(layout, dtype)
    kwargs = {}
    if crop is not None:
        kwargs.update(crop=(crop, crop), crop_pos_x=crop_pos[0], crop_pos_y=crop_pos[1])
    return fn.crop_mirror_normalize(
        images, mean=mean, std=1.0, mirror=mirror, output_layout=LAYOUTS[layout],
        dtype=types.FLOAT if dtype == "float32" else types.FLOAT16, **kwargs)


def random_crop_window(jpegs, crop: int, scale_min: int, scale_max: int):
    """(roi_start, roi_end), (y, x) in source pixels, of one random ``crop`` x ``crop`` crop of the image
    rescaled to shorter side S: a square of side ``crop * shorter / S`` at a uniform position."""
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types

    shape = fn.peek_image_shape(jpegs, dtype=types.FLOAT)      # (H, W, C) from the JPEG header
    h, w = shape[0], shape[1]
    side = crop * dmath.min(h, w) / random_scale(scale_min, scale_max)
    y0 = fn.random.uniform(range=[0.0, 1.0]) * (h - side)
    x0 = fn.random.uniform(range=[0.0, 1.0]) * (w - side)
    return fn.stack(y0, x0), fn.stack(y0 + side, x0 + side)


def train_augment(jpegs, cfg, stats: Stats, backend: str, with_draws: bool = False):
    """Decode + the paper's training augmentation; ``cfg`` is a DataConfig.

    ``with_draws``: also return the per-image numbers the pixels were made with, ``(roi_start,
    roi_end, mirror)`` (crop window (y, x) in source pixels; mirror a 0/1 node, or the constant 0 when
    ``cfg.flip`` is off), so boxes follow the very same crop and flip (``pipeline.box_augment``).

    "Rescale the shorter side to S, then take a random crop" is computed as one resampling of the
    crop's window in the source image (a region-of-interest resize straight to crop x crop): the same
    pixels up to rounding, the same antialiasing (it depends only on the scale), and only the crop's
    pixels are resampled instead of the whole image at S, which is faster on a CPU (docs/pipeline.md).
    The crop position is continuous rather than whole pixels of the rescaled image."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    images = decode(jpegs, backend, cfg.hw_decoder_load)
    start, end = random_crop_window(jpegs, cfg.crop_size, cfg.scale_min, cfg.scale_max)
    images = fn.resize(images, size=[cfg.crop_size, cfg.crop_size], roi_start=start, roi_end=end,
                       interp_type=types.INTERP_LINEAR, antialias=True)
    mirror = fn.random.coin_flip(probability=0.5) if cfg.flip else 0
    mean = color_shift_mean(stats, cfg.color_shift_std, cfg.mean_subtraction)
    images = normalize(images, mean=mean, mirror=mirror, layout=cfg.layout, dtype=cfg.dtype)
    return (images, (start, end, mirror)) if with_draws else images
