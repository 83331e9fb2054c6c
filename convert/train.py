"""Training DarkNet19 on the smear set (paper 000, Table 1; augmentations of paper 002 and the shift families).

SGD with momentum 0.9, L2 1e-4, a cosine learning-rate schedule after a one-epoch warm-up.
CPU-friendly progressive resizing: most epochs at a low resolution, the last ones at the shipped
224 px so batch-norm statistics match deployment. Then a second, shorter cosine cycle at 224 px with a
class-balanced loss and stronger augmentation (the *tune* stage): benign fields are the rarest class
(15% of train) and the one new patients get wrong most (REPORT.md, benign specificity), and the first
cycle's augmentation did not reach every moderate shift. The epoch kept is the one with the best
balanced accuracy (mean per-class recall) on the validation split (never the test split). Every epoch
is checkpointed; a re-run resumes.

Every training image is augmented (:mod:`convert.augment`: what another lab, microscope or camera does
to a field) and then goes through the device's own :func:`device.preprocess.prepare`, exactly as a
camera frame does on the Pi.
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

from convert.augment import augment
from convert.darknet import DarkNet19
from convert.figures import curves
from convert.options import CURVES_FILE, HISTORY_FILE, kept_epoch
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
