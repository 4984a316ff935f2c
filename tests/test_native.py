"""The kernel loader: builds once per kernel source, imports a completed build directly afterwards."""

from __future__ import annotations

import types

import pytest
import torch.utils.cpp_extension

from lm_tying.models.word2vec import native


@pytest.fixture
def messages(monkeypatch):
    """What the loader tells the user (its rank-zero info lines)."""
    said: list[str] = []
    monkeypatch.setattr(native, "rank_zero_info", said.append)
    return said


@pytest.fixture
def fake_builder(tmp_path, monkeypatch):
    """An empty extensions cache and a stand-in for torch's builder that records its calls (no compiler run)."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    calls: list[dict] = []

    def load(**kwargs):
        calls.append(kwargs)
        return types.SimpleNamespace(sequential_sgd="the built kernel")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", load)
    return calls


def test_the_name_follows_the_source_not_where_it_lies(tmp_path, monkeypatch):
    """Another checkout of the same source shares the build; an edited source gets a build of its own."""
    name = native.extension_name()
    assert name.startswith(f"lm_tying_sequential_sgd_{native._flags()[0]}_")
    elsewhere = tmp_path / "checkout" / "sequential_sgd.cpp"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(native.SOURCE.read_bytes())
    monkeypatch.setattr(native, "SOURCE", elsewhere)
    assert native.extension_name() == name
    elsewhere.write_bytes(native.SOURCE.read_bytes() + b"\n// edited\n")
    assert native.extension_name() != name


def test_without_a_completed_build_it_builds_says_so_and_marks_it_done(fake_builder, messages):
    module = native.sequential_sgd.__wrapped__()
    assert module.sequential_sgd == "the built kernel"
    build_dir = native.build_directory(native.extension_name())
    assert len(fake_builder) == 1 and fake_builder[0]["build_directory"] == str(build_dir)
    assert fake_builder[0]["sources"] == [str(native.SOURCE)]
    assert (build_dir / native.BUILT).exists()
    assert "building the compiled per-pair kernel" in messages[0] and "kernel built in" in messages[1]


def test_a_failed_build_is_not_marked_done_and_warns(fake_builder, monkeypatch):
    def no_compiler(**kwargs):
        fake_builder.append(kwargs)
        raise RuntimeError("Error building extension")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    for attempt in (1, 2):  # nothing marked done: the next run tries again
        with pytest.warns(UserWarning, match="cannot build the compiled word2vec kernel.*Error building extension"):
            assert native.sequential_sgd.__wrapped__() is None
        assert len(fake_builder) == attempt
    assert not (native.build_directory(native.extension_name()) / native.BUILT).exists()


def test_a_stale_torch_lock_is_removed_before_building(fake_builder):
    lock = native.build_directory(native.extension_name()) / "lock"
    lock.write_text("")
    with pytest.warns(UserWarning, match=f"removing {lock}: a stale build lock"):
        assert native.sequential_sgd.__wrapped__() is not None
    assert not lock.exists() and len(fake_builder) == 1


def test_a_completed_build_is_imported_without_torchs_builder(monkeypatch, messages):
    """No ninja run, no lock file of torch's, no message: the library a completed build left is imported."""
    if native.sequential_sgd() is None:  # builds here only if no other test or setup step did
        pytest.skip("no C++ compiler / ninja here: the kernel cannot be built")
    messages.clear()

    def builder_called(**kwargs):
        raise AssertionError("torch's builder ran although a completed build is cached")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", builder_called)
    module = native.sequential_sgd.__wrapped__()
    assert module is not None and callable(module.sequential_sgd)
    assert messages == []
