"""``python -m device install-bundle | rollback | bundles``: switch between signed bundles and show them."""

from __future__ import annotations

import argparse
from pathlib import Path

from device import config as config_mod
from device.commands import EXIT_OK, load_config


def _switch(args: argparse.Namespace, action: str) -> int:
    from device import install

    cfg = load_config(args.config)
    res = config_mod.resolve(cfg)
    verify = install.Verifier(res.keys_dir, threads=cfg.model.threads,
                              use_edgetpu=cfg.model.use_edgetpu)

    def say(msg: str) -> None:
        print(msg, flush=True)

    if action == "install":
        done = install.install_bundle(Path(args.path), res.bundles_dir, res.factory_dir, verify, progress=say)
    else:
        done = install.rollback(res.bundles_dir, res.factory_dir, verify, progress=say)
    for line in done.checks:
        say(f"ok   {line}")
    say(f"active:   {done.active}  ({done.active_dir})")
    say(f"previous: {done.previous or '-'}  (`python -m device rollback` returns to it)")
    say("service: " + ("not restarted (--no-restart)" if args.no_restart else install.restart_service()))
    return EXIT_OK


def cmd_install_bundle(args: argparse.Namespace) -> int:
    return _switch(args, "install")


def cmd_rollback(args: argparse.Namespace) -> int:
    return _switch(args, "rollback")


def cmd_bundles(args: argparse.Namespace) -> int:
    from device.install import installed

    res = config_mod.resolve(load_config(args.config))
    st = installed(res.bundles_dir, res.factory_dir)
    print(f"active:   {st.active}  ({st.active_dir}{', factory bundle' if st.factory else ''})")
    print(f"previous: {st.previous or '-'}" + (f"  ({st.previous_dir})" if st.previous_dir else ""))
    print(f"trusted keys: {res.keys_dir}")
    return EXIT_OK
