"""Nothing from elsewhere runs as our code: Hub datasets never run their loading scripts, and the
compiled CPU step is loaded only from a cache directory and file that are the user's alone."""

from __future__ import annotations

import os
import sys
import types
import warnings

import pytest

from dromedary.llama.kernels import native
from dromedary.recipe import importers


def fake_datasets(monkeypatch, version: str) -> list[dict]:
    calls: list[dict] = []
    module = types.SimpleNamespace(__version__=version,
                                   load_dataset=lambda name, **kw: calls.append(kw) or [{"id": 1}])
    monkeypatch.setitem(sys.modules, "datasets", module)
    return calls


@pytest.mark.parametrize("version, kwargs", [("4.0.0", {}), ("5.2.0", {}),
                                             ("3.6.0", {"trust_remote_code": False}),
                                             ("2.16.1", {"trust_remote_code": False})])
def test_hub_datasets_never_run_loading_scripts(monkeypatch, version, kwargs):
    calls = fake_datasets(monkeypatch, version)
    rows = list(importers._hub_rows("someone/dolly-typo", "dolly"))
    assert len(rows) == 1 and calls == [{"split": "train", **kwargs}]


def test_a_datasets_too_old_to_refuse_scripts_is_refused(monkeypatch):
    calls = fake_datasets(monkeypatch, "2.14.7")
    with pytest.raises(ValueError, match=r"datasets 2\.14\.7 may run .*pip install 'datasets>=4'"):
        list(importers._hub_rows("someone/dolly-typo", "dolly"))
    assert calls == []


def test_pyproject_requires_a_datasets_without_loading_scripts():
    text = (importers.Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"datasets>=4.0"' in text


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DROMEDARY_CACHE", str(tmp_path))
    native.library.cache_clear()
    if native.library() is None:
        native.library.cache_clear()
        pytest.skip("no native step here (needs an AVX512-BF16 CPU and a C compiler)")
    native.library.cache_clear()
    yield tmp_path / "native"
    native.library.cache_clear()


def load_warning() -> str:
    native.library.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert native.library() is None
    (w,) = [str(w.message) for w in caught if "native CPU decoding step" in str(w.message)]
    return w


def test_the_built_library_is_the_users_alone(cache):
    (lib,) = cache.glob("decode_cpu-*.so")
    assert not cache.stat().st_mode & 0o022 and not lib.stat().st_mode & 0o022


def test_a_library_others_may_write_is_not_loaded(cache):
    (lib,) = cache.glob("decode_cpu-*.so")
    os.chmod(lib, 0o777)
    assert load_warning() == (f"native CPU decoding step: not loading {lib}: others may write to it "
                              "(mode -rwxrwxrwx; `chmod go-w` it if it is yours); using the PyTorch step")
    os.chmod(lib, 0o755)
    os.chmod(cache, 0o777)
    assert f"not loading {cache}: others may write to it" in load_warning()
    os.chmod(cache, 0o700)
    native.library.cache_clear()
    assert native.library() is not None


def test_a_library_owned_by_someone_else_is_not_loaded(cache, monkeypatch):
    real = os.getuid()
    monkeypatch.setattr(native.os, "getuid", lambda: real + 1)  # as if another user had made it
    assert f"it is owned by uid {real}, not by you (uid {real + 1})" in load_warning()
