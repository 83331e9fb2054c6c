"""Training augmentation: what another lab, microscope or camera does to a field, then the device's own ``prepare``.

Stain (optical density), colour balance, hue, saturation, exposure, focus, magnification, JPEG, sensor noise
and the eyepiece's dark surround, at a strength that scales every range (:data:`AUG`); ``prepare`` then removes
what it can (colour balance via the background, the surround) and the network learns to ignore the rest.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from convert.shifts import hue_matrix, jpeg
from device.preprocess import prepare

#: Augmentation ranges at strength 1 (each scales with the strength): magnification x(1 +- zoom), stain amount
#: x(1 +- stain) per channel in optical density, RGB gains 1 +- gains, hue +- hue_deg, saturation
#: 1 +- saturation, gamma exp(+- log_gamma), sensor noise sd up to noise_sd (grey levels).
AUG = {"zoom": 0.25, "stain": 0.25, "gains": 0.15, "hue_deg": 20.0, "saturation": 0.35, "log_gamma": 0.25,
       "noise_sd": 6.0}


def describe_augmentation(strength: float) -> str:
    """The ranges :data:`AUG` gives at ``strength``, as the report states them."""
    st = strength
    z = 1 + AUG["zoom"] * max(st, 0.4)
    return (f"magnification x{1 / z:.2f}-{z:.2f}, stain x{1 - AUG['stain'] * st:.2f}-{1 + AUG['stain'] * st:.2f} "
            f"in optical density, RGB gains +-{AUG['gains'] * st:.2f}, hue +-{AUG['hue_deg'] * st:g} deg, saturation "
            f"x{1 - AUG['saturation'] * st:.2f}-{1 + AUG['saturation'] * st:.2f}, gamma "
            f"{math.exp(-AUG['log_gamma'] * st):.2f}-{math.exp(AUG['log_gamma'] * st):.2f}, sensor noise sd <= "
            f"{AUG['noise_sd'] * st:g}")


def _u(gen: torch.Generator, n: int, lo: float, hi: float, *shape: int) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, *shape, generator=gen)


def _maybe(gen: torch.Generator, n: int, p: float) -> torch.Tensor:
    return (torch.rand(n, generator=gen) < p).float()


def augment_geometry(x: torch.Tensor, gen: torch.Generator, strength: float) -> torch.Tensor:
    """90-degree rotations, flips, zoom (magnification), shear, shift; ``x`` (N,3,H,W) 0..255."""
    n = x.shape[0]
    x = torch.rot90(x, int(torch.randint(0, 4, (1,), generator=gen)), dims=(2, 3))
    flip = torch.rand(n, generator=gen) < 0.5
    x[flip] = x[flip].flip(3)
    zoom = torch.exp(_u(gen, n, -1, 1) * math.log(1 + AUG["zoom"] * max(strength, 0.4)))
    shear = _u(gen, n, -0.1, 0.1)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = 1 / zoom
    theta[:, 0, 1] = shear
    theta[:, 1, 1] = 1 / zoom
    theta[:, :, 2] = _u(gen, n, -0.1, 0.1, 2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def augment_colour(x: torch.Tensor, gen: torch.Generator, strength: float) -> torch.Tensor:
    """Stain (optical density), colour balance, hue, saturation, gamma, defocus and sensor noise."""
    n, st = x.shape[0], strength
    if st <= 0:
        return x
    # Stain amount and hue per channel in optical-density space (Beer-Lambert): OD = -log(I / I0).
    od = -torch.log((x + 1) / 256)
    m = _maybe(gen, n, 0.8)[:, None, None, None]
    alpha = 1 + m * _u(gen, n, -AUG["stain"] * st, AUG["stain"] * st, 3, 1, 1)
    beta = m * _u(gen, n, -0.05 * st, 0.05 * st, 3, 1, 1)
    x = (256 * torch.exp(-(od * alpha + beta)) - 1)
    # Colour balance (RGB gains): the background normalisation removes most of it, not where clipped.
    x = x * (1 + _maybe(gen, n, 0.5)[:, None, None, None] * _u(gen, n, -AUG["gains"] * st, AUG["gains"] * st, 3, 1, 1))
    # Hue rotation about the grey axis and saturation.
    ang = _maybe(gen, n, 0.5) * _u(gen, n, -math.radians(AUG["hue_deg"]) * st, math.radians(AUG["hue_deg"]) * st)
    rot = torch.from_numpy(np.stack([hue_matrix(float(a)) for a in ang])).float()
    x = torch.einsum("nij,njhw->nihw", rot, x)
    grey = x.mean(1, keepdim=True)
    ds = AUG["saturation"] * st
    sat = 1 + _maybe(gen, n, 0.5)[:, None, None, None] * _u(gen, n, -ds, ds, 1, 1, 1)
    x = grey + sat * (x - grey)
    # Exposure: gamma and brightness.
    x = x.clamp(0, 255)
    lg = AUG["log_gamma"] * st
    gamma = torch.exp(_maybe(gen, n, 0.5) * _u(gen, n, -lg, lg))[:, None, None, None]
    gain = 1 + _maybe(gen, n, 0.5)[:, None, None, None] * _u(gen, n, -0.15 * st, 0.1 * st, 1, 1, 1)
    x = 255 * (x / 255) ** gamma * gain
    # Slight defocus: a Gaussian blur, sigma up to 1.2 px, on a third of the images.
    sig = _maybe(gen, n, 0.33) * _u(gen, n, 0.3, 0.3 + 0.9 * st)
    if bool((sig > 0).any()):
        t = torch.arange(-3, 4, dtype=torch.float32)
        k = torch.exp(-(t[None] ** 2) / (2 * sig[:, None].clamp(min=1e-3) ** 2))
        k = torch.where(sig[:, None] > 0, k, (t[None] == 0).float())
        k = k / k.sum(1, keepdim=True)
        xs = x.reshape(1, n * 3, *x.shape[2:])
        kk = k.repeat_interleave(3, 0)
        xs = F.conv2d(F.pad(xs, (3, 3, 0, 0), mode="reflect"), kk[:, None, None, :], groups=n * 3)
        xs = F.conv2d(F.pad(xs, (0, 0, 3, 3), mode="reflect"), kk[:, None, :, None], groups=n * 3)
        x = xs.reshape(x.shape)
    # Sensor noise.
    noise = _maybe(gen, n, 0.3)[:, None, None, None] * _u(gen, n, 0, AUG["noise_sd"] * st, 1, 1, 1)
    x = x + noise * torch.randn(x.shape, generator=gen)
    return x.clamp(0, 255)


def eyepiece(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The field as the lit disc of an eyepiece: dark outside a circle of radius 0.5..0.72 of the side."""
    s = img.shape[0]
    r = rng.uniform(0.5, 0.66) * s
    cx, cy = s / 2 + rng.uniform(-0.04, 0.04) * s, s / 2 + rng.uniform(-0.04, 0.04) * s
    yy, xx = np.ogrid[:s, :s]
    out = img.copy()
    out[(xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 > r * r] = rng.integers(0, 25)
    return out


def augment(x: torch.Tensor, gen: torch.Generator, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Source images (N,3,S,S) float 0..255 -> augmented and then prepared by the device code, (N,S,S,3) uint8.

    At a low training resolution the sources are shrunk first (cheaper, and ``prepare`` is size-agnostic).
    """
    x = augment_colour(augment_geometry(x, gen, strength), gen, strength)
    imgs = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = np.empty_like(imgs)
    for i, im in enumerate(imgs):
        if strength > 0 and rng.random() < 0.3:
            im = jpeg(im, int(rng.integers(30, 91)))
        if rng.random() < 0.25:
            im = eyepiece(im, rng)
        out[i] = prepare(im, im.shape[0], side_px=im.shape[0]).rgb
    return out
