"""scripts/build_llamacpp.py: finding and downloading llama-cpp-python's source release."""
import importlib.util
import io
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "build_llamacpp.py"


@pytest.fixture
def script():
    spec = importlib.util.spec_from_file_location("build_llamacpp", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def simple_index(monkeypatch, files, seen):
    def urlopen(request, timeout=None):
        seen.append(request)
        return io.BytesIO(json.dumps({"files": files}).encode())

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)


def test_the_source_release_is_found_in_the_simple_index(script, monkeypatch):
    seen = []
    simple_index(monkeypatch, [
        {"filename": "llama_cpp_python-0.3.35.tar.gz", "url": "https://files/old.tar.gz"},
        {"filename": "llama_cpp_python-0.3.36-cp311-linux_x86_64.whl", "url": "https://files/wheel"},
        {"filename": "llama_cpp_python-0.3.36.tar.gz", "url": "https://files/new.tar.gz"},
    ], seen)
    assert script.sdist_url("0.3.36") == ("llama_cpp_python-0.3.36.tar.gz", "https://files/new.tar.gz")
    assert seen[0].full_url == "https://pypi.org/simple/llama-cpp-python/"
    assert seen[0].get_header("Accept") == "application/vnd.pypi.simple.v1+json"


def test_a_version_without_source_release_is_named(script, monkeypatch):
    simple_index(monkeypatch, [{"filename": "llama_cpp_python-0.3.35.tar.gz", "url": "u"}], [])
    with pytest.raises(SystemExit, match="no source release llama_cpp_python-9.9.9.tar.gz"):
        script.download_sdist("9.9.9", Path("unused"))


def test_a_failed_download_says_what_to_do(script, monkeypatch, tmp_path):
    def urlopen(request, timeout=None):
        raise urllib.error.HTTPError(request.full_url, 404, "Not Found", {}, None)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    with pytest.raises(SystemExit, match="cannot download .*404.*--sdist FILE"):
        script.download_sdist("0.3.36", tmp_path)
    assert list(tmp_path.iterdir()) == []
