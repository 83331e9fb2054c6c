"""``python -m device calibrate``: the field scale (a red-cell diameter, from the fields' texture) from image files
or the camera."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from device import config as config_mod
from device.commands import EXIT_OK, load_config
from device.errors import ConfigError


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Measure the field scale (red-cell diameter from the texture scale) from image files or the configured camera."""
    from device.bundle import load_bundle, side_px
    from device.calibrate import calibrate, write_to_config
    from device.preprocess import load_image

    cfg = load_config(args.config)
    res = config_mod.resolve(cfg)
    if args.images:
        frames = [np.asarray(load_image(p)) for p in args.images]
    else:
        from device.app import configured_source

        factory, kind = configured_source(res)
        src = factory()
        try:
            frames = [src.read().array for _ in range(args.frames)]
        finally:
            src.close()
    cal = calibrate(frames)
    bundle = load_bundle(res.model_dir)
    side = side_px(bundle, cal.rbc_diameter_px)
    print(f"field scale: red-cell diameter {cal.rbc_diameter_px:.1f} px (median from the texture of {cal.fields} of "
          f"{len(frames)} fields) "
          f"(training images: {bundle.rbc_diameter_px:.1f} px in a {bundle.field_px:.0f} px field): each field will be "
          f"a {side:.0f} px square of the frame, resized to {bundle.input.size} px", flush=True)
    if args.write:
        if not cfg.path:
            raise ConfigError("--write needs --config FILE (the file to update); or add "
                              f"'rbc_diameter_px = {cal.rbc_diameter_px:.2f}' under [camera] yourself")
        write_to_config(Path(cfg.path), cal.rbc_diameter_px)
        load_config(str(cfg.path))  # the file must still be valid
        print(f"wrote [camera] rbc_diameter_px = {cal.rbc_diameter_px:.2f} to {cfg.path}; restart the service",
              flush=True)
    return EXIT_OK
