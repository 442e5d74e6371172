"""The llama-server build folder is reused only when CMake would accept it: checked against a real CMake
configure of a tiny project (a new pin or a moved checkout made `make llama-server` fail in CMake)."""

import shutil
import subprocess

import pytest

from helpers.machine.server_build import cache_matches, start_afresh

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")


def configure(source, build):
    source.mkdir(parents=True, exist_ok=True)
    (source / "CMakeLists.txt").write_text("cmake_minimum_required(VERSION 3.14)\nproject(tiny NONE)\n")
    subprocess.run(["cmake", "-S", source, "-B", build], check=True, capture_output=True)


def cmake_accepts(source, build) -> bool:
    return subprocess.run(["cmake", "-S", source, "-B", build], capture_output=True).returncode == 0


def test_no_cache_yet(tmp_path):
    assert cache_matches(tmp_path / "build", tmp_path / "src")


def test_same_source_and_folder_is_reused(tmp_path):
    configure(tmp_path / "llama.cpp-a", tmp_path / "build")
    assert cache_matches(tmp_path / "build", tmp_path / "llama.cpp-a")
    assert cmake_accepts(tmp_path / "llama.cpp-a", tmp_path / "build")


def test_another_versions_source_is_not(tmp_path):
    configure(tmp_path / "llama.cpp-a", tmp_path / "build")
    configure(tmp_path / "llama.cpp-b", tmp_path / "other")
    assert not cache_matches(tmp_path / "build", tmp_path / "llama.cpp-b")
    assert not cmake_accepts(tmp_path / "llama.cpp-b", tmp_path / "build")  # what the check spares the user


def test_a_moved_build_folder_is_not(tmp_path):
    configure(tmp_path / "old" / "llama.cpp-a", tmp_path / "old" / "build")
    shutil.copytree(tmp_path / "old", tmp_path / "new")
    assert not cache_matches(tmp_path / "new" / "build", tmp_path / "new" / "llama.cpp-a")
    assert not cmake_accepts(tmp_path / "new" / "llama.cpp-a", tmp_path / "new" / "build")


def test_other_settings_start_afresh_an_interrupted_build_resumes(tmp_path):
    configure(tmp_path / "llama.cpp-a", tmp_path / "build")
    cuda, cpu = {"version": "a", "cmake_args": ["-DGGML_CUDA=on"]}, {"version": "a", "cmake_args": []}
    assert start_afresh(tmp_path / "build", tmp_path / "llama.cpp-a", cuda, cpu)  # the cache keeps GGML_CUDA
    assert not start_afresh(tmp_path / "build", tmp_path / "llama.cpp-a", cpu, cpu)
    assert not start_afresh(tmp_path / "build", tmp_path / "llama.cpp-a", None, cpu)  # never finished: resume
    assert not start_afresh(tmp_path / "nothing-yet", tmp_path / "llama.cpp-a", cuda, cpu)
