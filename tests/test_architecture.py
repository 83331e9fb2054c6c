"""The module rules (issue 14) hold for the tree as committed: see tools/archcheck.py."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _archcheck():
    spec = importlib.util.spec_from_file_location("archcheck", ROOT / "tools" / "archcheck.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["archcheck"] = mod
    spec.loader.exec_module(mod)
    return mod


arch = _archcheck()


def test_the_tree_keeps_the_module_rules():
    breaches = arch.check(ROOT)
    assert not breaches, "\n".join(map(str, breaches))


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    for pkg in arch.PRIVATE_SCAN:
        (tmp_path / pkg).mkdir(exist_ok=True)
    return tmp_path


@pytest.mark.parametrize("files, rule", [
    ({"device/a.py": "x = 1\n" * (arch.MAX_MODULE_LINES + 1)}, "module over"),
    ({"device/a.py": "class A:\n" + "    x = 1\n" * arch.MAX_CLASS_LINES}, "class over"),
    ({"device/a.py": "from device import b\n", "device/b.py": "import device.a\n"}, "import cycle"),
    ({"device/a.py": "def _f():\n    pass\n", "bench/b.py": "from device.a import _f\n"}, "private name imported"),
    ({"device/a.py": "def _f():\n    pass\n", "convert/b.py": "from device import a\na._f()\n"},
     "private name reached"),
])
def test_each_rule_finds_its_breach(tmp_path, files, rule):
    found = arch.check(_tree(tmp_path, files))
    assert [b.rule for b in found if rule in b.rule], found


def test_lazy_imports_count_and_type_checking_ones_do_not(tmp_path):
    lazy = {"device/a.py": "def f():\n    from device import b\n", "device/b.py": "from device import a\n"}
    assert any(b.rule == "import cycle" for b in arch.check(_tree(tmp_path / "1", lazy)))
    typed = {"device/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from device import b\n",
             "device/b.py": "from device import a\n"}
    assert not arch.check(_tree(tmp_path / "2", typed))
