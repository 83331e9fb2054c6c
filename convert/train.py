"""Training DarkNet19 on the smear set (paper 000, Table 1; augmentations of paper 002 and the shift families).

SGD with momentum 0.9, L2 1e-4, a cosine learning-rate schedule after a one-epoch warm-up.
CPU-friendly progressive resizing: most epochs at a low resolution, the last ones at the shipped
224 px so batch-norm statistics match deployment. Then a second, shorter cosine cycle at 224 px with a
class-balanced loss (the *tune* stage): benign fields are the rarest class (15% of train) and the one a
new patient gets wrong most, and the fine detail that tells a hematogone from a blast is only there at
224 px. The epoch kept is the one with the best balanced accuracy (mean per-class recall) on the
validation split (never the test split). Every epoch is checkpointed; a re-run resumes.

Every training image goes through the device's own :func:`device.preprocess.prepare` after
augmentation, exactly as a camera frame does on the Pi: augmentation imitates what another lab,
microscope or camera does to a field (stain, colour balance, hue, saturation, exposure, focus,
magnification, JPEG, sensor noise, the eyepiece's dark surround); ``prepare`` then removes what it can
(colour balance via the background, the surround) and the network learns to ignore the rest.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from convert.darknet import DarkNet19
from convert.figures import curves
from convert.options import CURVES_FILE, HISTORY_FILE, kept_epoch
from convert.shifts import hue_matrix, jpeg
from device.preprocess import prepare

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    size: int = 224
    low_size: int = 128
    low_epochs: int = 14
    high_epochs: int = 3
    batch: int = 32
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    width: float = 1.0
    seed: int = 0
    #: Augmentation strength of the first cycle (:data:`AUG` at 1.0: stain x0.75-1.25, gamma 0.78-1.28, noise
    #: sd <= 6); 0 turns colour/blur/JPEG off.
    shift_strength: float = 1.0
    #: The tune stage: epochs at ``size`` after the first cycle, class-balanced loss, cosine from ``tune_lr``.
    tune_epochs: int = 6
    tune_lr: float = 0.004
    #: The tune stage's augmentation strength: at 1.5 every shift family's moderate strength lies inside its
    #: range (gamma 1.43 and 0.7, stain x1.3, sensor noise 8); at 1.0 those three did not.
    tune_shift_strength: float = 1.5

    @property
    def first_epochs(self) -> int:
        """Epochs of the first cycle (the recipe before the tune stage existed)."""
        return self.low_epochs + self.high_epochs

    @property
    def epochs(self) -> int:
        return self.first_epochs + self.tune_epochs

    def size_at(self, epoch: int) -> int:
        return self.low_size if epoch < self.low_epochs else self.size

    def tuning(self, epoch: float) -> bool:
        return epoch >= self.first_epochs

    def strength_at(self, epoch: float) -> float:
        return self.tune_shift_strength if self.tuning(epoch) else self.shift_strength

    def lr_at(self, epoch: float) -> float:
        """Cosine from the stage's peak to 1% of it over the stage (``epoch`` may be fractional), after a
        one-epoch linear warm-up at the start of each stage (the tune stage starts with fresh momentum)."""
        start, n, peak = ((self.first_epochs, self.tune_epochs, self.tune_lr) if self.tuning(epoch)
                          else (0, self.first_epochs, self.lr))
        e = epoch - start
        cos = 0.5 * (1 + math.cos(math.pi * min(e / max(n, 1), 1.0)))
        return peak * (0.01 + 0.99 * cos) * min(1.0, 0.1 + 0.9 * e)

    def first_cycle(self) -> dict:
        """This configuration as the recipe without a tune stage wrote it (the committed weights' config)."""
        d = asdict(self)
        for k in ("tune_epochs", "tune_lr", "tune_shift_strength"):
            d.pop(k)
        return d


def class_weights(y: np.ndarray, num_classes: int) -> torch.Tensor:
    """Loss weights n / (K * n_c): every class weighs as much as if the classes were balanced."""
    n = np.bincount(y, minlength=num_classes).astype(np.float64)
    return torch.tensor(len(y) / (num_classes * np.maximum(n, 1)), dtype=torch.float32)


def balanced_accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    """Mean per-class recall over the classes present in ``y``."""
    if not len(y):
        return float("nan")
    return float(np.mean([(pred[y == c] == c).mean() for c in np.unique(y)]))


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


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(rgb).permute(0, 3, 1, 2).float()


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


@torch.no_grad()
def predict(net: DarkNet19, rgb: np.ndarray, size: int, batch: int = 64) -> np.ndarray:
    """Softmax probabilities for (N,H,W,3) uint8 prepared images."""
    net.eval()
    out = []
    for i in range(0, len(rgb), batch):
        x = to_tensor(rgb[i:i + batch])
        out.append(torch.softmax(net(resize(x, size)), 1).numpy())
    return np.concatenate(out) if out else np.zeros((0, net.classifier.out_features), np.float32)


def _evaluate(net: DarkNet19, x_val: np.ndarray, y_val: np.ndarray, size: int) -> tuple[float, float]:
    pred = predict(net, x_val, size).argmax(1)
    return (float((pred == y_val).mean()) if len(y_val) else float("nan")), balanced_accuracy(pred, y_val)


def train(cfg: TrainConfig, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
          num_classes: int, out_dir: Path, first_cycle: dict | None = None) -> DarkNet19:
    """Train (or resume); return the network of the best validation epoch.

    ``x_train`` are source images (scale bar painted over), augmented and prepared per batch;
    ``x_val`` are already prepared by the device code. Writes checkpoints, history and curves to ``out_dir``.
    ``first_cycle``, a state dict of a network trained by this recipe's first cycle (the committed weights
    of the recipe before the tune stage), skips that cycle: training starts at the tune stage from it, and
    it is itself a candidate for the kept epoch. Its optimizer momentum is not kept, so the result differs
    slightly from a run from scratch.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    net = DarkNet19(num_classes, width=cfg.width)
    # Input normalisation (inside the graph) from the prepared, un-augmented training images.
    sample = np.stack([prepare(im, im.shape[0], side_px=im.shape[0]).rgb for im in x_train[::4]])
    flat = sample.reshape(-1, 3).astype(np.float64)
    net.set_normalisation(flat.mean(0), flat.std(0) + 1e-3)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    ckpt, best_path = out_dir / "last.pt", out_dir / "best.pt"
    history: list[dict] = []
    start = 0
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        if state["config"] == asdict(cfg):
            net.load_state_dict(state["model"])
            opt.load_state_dict(state["optim"])
            history, start = state["history"], state["epoch"] + 1
            gen.set_state(state["gen"])
            rng.bit_generator.state = state["rng"]
            log.info("resuming from %s at epoch %d/%d", ckpt, start + 1, cfg.epochs)
        else:
            log.warning("checkpoint %s was made with another config; starting afresh", ckpt)
    if start == 0 and first_cycle is not None:
        net.load_state_dict(first_cycle)
        start = cfg.first_epochs
        acc, bacc = _evaluate(net, x_val, y_val, cfg.size)
        history = [{"epoch": start, "size": cfg.size, "lr": float("nan"), "train_loss": float("nan"),
                    "train_acc": float("nan"), "val_acc": acc, "val_bacc": bacc, "seconds": 0.0, "given": True}]
        torch.save({"model": net.state_dict(), "epoch": start, "val_acc": acc, "val_bacc": bacc}, best_path)
        log.info("first cycle given (epoch %d): validation accuracy %.4f, balanced %.4f; tune stage next",
                 start, acc, bacc)
    ytr = torch.from_numpy(y_train).long()
    balanced = class_weights(y_train, num_classes)
    steps_per_epoch = math.ceil(len(x_train) / cfg.batch)
    for epoch in range(start, cfg.epochs):
        size = cfg.size_at(epoch)
        net.train()
        perm = torch.randperm(len(x_train), generator=gen)
        t0, seen, loss_sum, correct = time.time(), 0, 0.0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs} {size}px",
                   unit="batch", dynamic_ncols=True, mininterval=5.0)
        for step in bar:
            idx = perm[step * cfg.batch:(step + 1) * cfg.batch]
            if len(idx) < 2:
                continue
            e = epoch + step / steps_per_epoch
            lr = cfg.lr_at(e)
            for g in opt.param_groups:
                g["lr"] = lr
            x = to_tensor(augment(resize(to_tensor(x_train[idx.numpy()]), size), gen, rng, cfg.strength_at(epoch)))
            y = ytr[idx]
            logits = net(x)
            loss = F.cross_entropy(logits, y, weight=balanced if cfg.tuning(epoch) else None)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(idx)
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == y).sum())
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", lr=f"{lr:.4f}",
                            ips=f"{seen / (time.time() - t0):.1f}")
        bar.close()
        val_acc, val_bacc = _evaluate(net, x_val, y_val, size)
        rec = {"epoch": epoch + 1, "size": size, "lr": lr, "train_loss": loss_sum / max(seen, 1),
               "train_acc": correct / max(seen, 1), "val_acc": val_acc, "val_bacc": val_bacc,
               "seconds": time.time() - t0}
        history.append(rec)
        log.info("epoch %d: loss %.4f train %.4f val %.4f balanced %.4f (%.0f s)", epoch + 1, rec["train_loss"],
                 rec["train_acc"], val_acc, val_bacc, rec["seconds"])
        if kept_epoch(history, cfg.size) == epoch + 1:
            torch.save({"model": net.state_dict(), "epoch": epoch + 1, "val_acc": val_acc, "val_bacc": val_bacc},
                       out_dir / "best.tmp")
            os.replace(out_dir / "best.tmp", best_path)
        torch.save({"model": net.state_dict(), "optim": opt.state_dict(), "epoch": epoch, "history": history,
                    "config": asdict(cfg), "gen": gen.get_state(), "rng": rng.bit_generator.state},
                   out_dir / "last.tmp")
        os.replace(out_dir / "last.tmp", ckpt)
        (out_dir / HISTORY_FILE).write_text(json.dumps(history, indent=1))
        curves(history, out_dir / CURVES_FILE)
    if best_path.exists():
        best = torch.load(best_path, weights_only=False)
        net.load_state_dict(best["model"])
        log.info("kept epoch %d (validation accuracy %.4f, balanced %.4f)", best["epoch"], best["val_acc"],
                 best.get("val_bacc", float("nan")))
    net.eval()
    return net
