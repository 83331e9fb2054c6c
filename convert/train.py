"""Training DarkNet19 on the smear set (paper 000, Table 1; augmentations of paper 002).

SGD with momentum 0.9, initial LR 0.01, L2 1e-4, LR dropped x0.1 twice.
CPU-friendly progressive resizing: most epochs at a low resolution, the last
ones at the shipped 224 px so batch-norm statistics match deployment.
Every epoch is checkpointed; a re-run resumes where it stopped.
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

log = logging.getLogger(__name__)

#: Where the "10 um" scale-bar label sits in the 224x224 source images
#: (rows, cols). Camera frames have no such label, so training hides it half
#: of the time to stop the network from reading the label's colour.
SCALE_BAR_BOX = (slice(196, 224), slice(180, 224))


@dataclass(frozen=True)
class TrainConfig:
    size: int = 224
    low_size: int = 128
    low_epochs: int = 18
    high_epochs: int = 3
    batch: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    width: float = 1.0
    seed: int = 0
    mask_corner_p: float = 0.5

    @property
    def epochs(self) -> int:
        return self.low_epochs + self.high_epochs

    def size_at(self, epoch: int) -> int:
        return self.low_size if epoch < self.low_epochs else self.size

    def lr_at(self, epoch: int) -> float:
        """Paper: LR 0.01 dropped x0.1; here at 60% of the run and for the last epoch."""
        drop1 = max(1, round(0.6 * self.epochs))
        lr = self.lr * (0.1 if epoch >= drop1 else 1.0)
        if self.epochs > 2 and epoch == self.epochs - 1:
            lr *= 0.1
        return lr


def mask_corner(x: torch.Tensor) -> torch.Tensor:
    """Paint the scale-bar corner of (N,3,224,224) pixels with each image's median colour."""
    rows, cols = SCALE_BAR_BOX
    fill = x.flatten(2).median(dim=2).values[:, :, None, None]
    x = x.clone()
    x[:, :, rows, cols] = fill
    return x


def augment(x: torch.Tensor, gen: torch.Generator, mask_p: float) -> torch.Tensor:
    """Flips, 90-degree rotations, shift/zoom/shear with nearest fill, brightness.

    ``x`` is (N,3,H,W) float pixels 0..255 at source resolution.
    """
    n = x.shape[0]
    if mask_p > 0 and x.shape[-1] == 224:
        m = torch.rand(n, generator=gen) < mask_p
        if m.any():
            x[m] = mask_corner(x[m])
    k = int(torch.randint(0, 4, (1,), generator=gen))
    x = torch.rot90(x, k, dims=(2, 3))
    flip = torch.rand(n, generator=gen) < 0.5
    x[flip] = x[flip].flip(3)
    # Affine: zoom 0.9..1.1, shear +-0.15, shift +-10% (paper 002's ranges).
    zoom = 1 + (torch.rand(n, generator=gen) - 0.5) * 0.2
    shear = (torch.rand(n, generator=gen) - 0.5) * 0.3
    shift = (torch.rand(n, 2, generator=gen) - 0.5) * 0.2
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = 1 / zoom
    theta[:, 0, 1] = shear
    theta[:, 1, 1] = 1 / zoom
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    gain = 1 + (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.2
    return (x * gain).clamp(0, 255)


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(rgb).permute(0, 3, 1, 2).float()


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


@torch.no_grad()
def predict(net: DarkNet19, rgb: np.ndarray, size: int, batch: int = 64, masked: bool = False) -> np.ndarray:
    """Softmax probabilities for (N,H,W,3) uint8 images."""
    net.eval()
    out = []
    for i in range(0, len(rgb), batch):
        x = to_tensor(rgb[i:i + batch])
        if masked:
            x = mask_corner(x)
        out.append(torch.softmax(net(resize(x, size)), 1).numpy())
    return np.concatenate(out) if out else np.zeros((0, net.classifier.out_features), np.float32)


def train(cfg: TrainConfig, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
          num_classes: int, out_dir: Path) -> DarkNet19:
    """Train (or resume) and return the network; writes checkpoints, history and curves to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    net = DarkNet19(num_classes, width=cfg.width)
    flat = x_train.reshape(-1, 3).astype(np.float64)
    net.set_normalisation(flat.mean(0), flat.std(0) + 1e-3)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    ckpt = out_dir / "last.pt"
    history: list[dict] = []
    start = 0
    gen = torch.Generator().manual_seed(cfg.seed)
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        if state["config"] == asdict(cfg):
            net.load_state_dict(state["model"])
            opt.load_state_dict(state["optim"])
            history, start = state["history"], state["epoch"] + 1
            gen.set_state(state["gen"])
            log.info("resuming from %s at epoch %d/%d", ckpt, start + 1, cfg.epochs)
        else:
            log.warning("checkpoint %s was made with another config; starting afresh", ckpt)
    ytr = torch.from_numpy(y_train).long()
    steps_per_epoch = math.ceil(len(x_train) / cfg.batch)
    for epoch in range(start, cfg.epochs):
        size, lr = cfg.size_at(epoch), cfg.lr_at(epoch)
        net.train()
        perm = torch.randperm(len(x_train), generator=gen)
        t0, seen, loss_sum, correct = time.time(), 0, 0.0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs} {size}px lr={lr:g}",
                   unit="batch", dynamic_ncols=True, mininterval=2.0)
        for step in bar:
            idx = perm[step * cfg.batch:(step + 1) * cfg.batch]
            if len(idx) < 2:
                continue
            warm = min(1.0, (step + 1) / steps_per_epoch) if epoch == 0 else 1.0  # linear warm-up
            for g in opt.param_groups:
                g["lr"] = lr * (0.1 + 0.9 * warm)
            x = resize(augment(to_tensor(x_train[idx.numpy()]), gen, cfg.mask_corner_p), size)
            y = ytr[idx]
            logits = net(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(idx)
            loss_sum += float(loss) * len(idx)
            correct += int((logits.argmax(1) == y).sum())
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}",
                            ips=f"{seen / (time.time() - t0):.1f}")
        bar.close()
        probs = predict(net, x_test, size)
        test_acc = float((probs.argmax(1) == y_test).mean()) if len(y_test) else float("nan")
        rec = {"epoch": epoch + 1, "size": size, "lr": lr, "train_loss": loss_sum / max(seen, 1),
               "train_acc": correct / max(seen, 1), "test_acc": test_acc, "seconds": time.time() - t0}
        history.append(rec)
        log.info("epoch %d: loss %.4f train %.4f test %.4f (%.0f s)", epoch + 1, rec["train_loss"],
                 rec["train_acc"], test_acc, rec["seconds"])
        torch.save({"model": net.state_dict(), "optim": opt.state_dict(), "epoch": epoch, "history": history,
                    "config": asdict(cfg), "gen": gen.get_state()}, out_dir / "last.tmp")
        os.replace(out_dir / "last.tmp", ckpt)
        (out_dir / "history.json").write_text(json.dumps(history, indent=1))
        plot_curves(history, out_dir / "curves.png")
    net.eval()
    return net


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot(ep, [h["train_loss"] for h in history], marker="o")
    a.set_xlabel("epoch"), a.set_ylabel("training loss"), a.grid(alpha=0.3)
    b.plot(ep, [h["train_acc"] for h in history], marker="o", label="train (augmented)")
    b.plot(ep, [h["test_acc"] for h in history], marker="s", label="held-out 30%")
    b.set_xlabel("epoch"), b.set_ylabel("accuracy"), b.grid(alpha=0.3), b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
