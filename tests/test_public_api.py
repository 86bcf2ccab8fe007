"""The public API resolves, stays light to import, and installs no top-level `adapters` module."""

import subprocess
import sys

import blackbox_proxy


def _run(code: str, cwd) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_every_public_name_resolves():
    for name in blackbox_proxy.__all__:
        assert getattr(blackbox_proxy, name) is not None, name


def test_import_is_light_and_adapters_live_under_the_package(tmp_path):
    out = _run(
        "import sys, importlib.util, blackbox_proxy, blackbox_proxy.adapters.base as b;"
        "print('torch' in sys.modules, importlib.util.find_spec('adapters') is None, b.__name__)",
        cwd=tmp_path,
    )
    assert out == "False True blackbox_proxy.adapters.base"
