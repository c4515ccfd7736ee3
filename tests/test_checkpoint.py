"""Checkpoint store on real fsspec filesystems: completeness marker, newest-complete, pruning."""

import fsspec
import pytest
import torch

from ssl_ebm.checkpoint import CheckpointError, CheckpointStore, resolve_resume


def _save(store, step, value):
    name = store.dir_name("step", step)
    store.write_torch(name, "model.pt", {"w": torch.full((3,), float(value))})
    store.write_json(name, "meta.json", {"step": step})
    store.mark_complete(name)
    return name


@pytest.fixture(params=["file", "memory"])
def store(request, tmp_path):
    if request.param == "file":
        yield CheckpointStore(f"file://{tmp_path}/ckpt")
        return
    url = f"memory://ckpt-test-{id(request)}"
    yield CheckpointStore(url)
    fsspec.filesystem("memory").rm(url.removeprefix("memory://"), recursive=True)


def test_latest_ignores_incomplete_and_prunes(store):
    for step in (10, 20, 30):
        _save(store, step, step)
    partial = store.dir_name("step", 40)  # a save killed before COMPLETE
    store.write_torch(partial, "model.pt", {"w": torch.zeros(3)})
    assert store.latest() == "step-000030"
    assert resolve_resume(store, "auto")[1] == "step-000030"
    assert store.read_torch("step-000030", "model.pt")["w"][0] == 30
    store.prune("step", keep=2)
    assert [s for s, _ in store.complete()] == [20, 30]
    assert store.exists(partial, "model.pt"), "a newer partial save is not ours to delete"
    _save(store, 50, 50)
    store.prune("step", keep=2)
    assert [s for s, _ in store.complete()] == [30, 50]
    assert not store.exists(partial, "model.pt"), "dead partial saves older than the newest are removed"


def test_resume_never_and_explicit(store):
    assert resolve_resume(store, "auto") is None
    name = _save(store, 5, 1)
    assert resolve_resume(store, "never") is None
    other, found = resolve_resume(store, store.url_of(name))
    assert found == name
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        resolve_resume(store, store.url_of("step-000099"))


def test_missing_file_is_one_clear_error(store):
    name = _save(store, 1, 1)
    with pytest.raises(CheckpointError, match="optimizer.pt is missing"):
        store.read_torch(name, "optimizer.pt")


def test_unwritable_location_detected(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    store = CheckpointStore(str(ro / "ckpt"))
    try:
        import os
        if os.geteuid() == 0:  # root ignores permission bits: use a path under a regular file instead
            (tmp_path / "afile").write_text("x")
            store = CheckpointStore(str(tmp_path / "afile" / "ckpt"))
        with pytest.raises(CheckpointError, match="not writable"):
            store.check_writable()
    finally:
        ro.chmod(0o700)


def test_a_save_over_a_complete_directory_unmarks_it_before_the_first_file(store):
    """A save cut short after replacing one file of an existing complete checkpoint (a best-N written again,
    a save repeated after a resume) must not leave a directory that looks complete with mixed files."""
    name = _save(store, 10, 1)
    store.write_torch(name, "model.pt", {"w": torch.full((3,), 2.0)})  # the save stops here
    assert store.complete() == [], "a directory whose files are being replaced must not look complete"
    store.write_json(name, "meta.json", {"step": 10})
    store.mark_complete(name)
    assert store.latest() == name and store.read_torch(name, "model.pt")["w"][0] == 2


def test_a_delete_cut_short_leaves_no_complete_directory(store, monkeypatch):
    """remove (and so prune and the watchdog's roll-back) deletes COMPLETE first: a delete interrupted after
    that leaves a partial directory, never a complete one with files missing."""
    keep, doomed = _save(store, 10, 1), _save(store, 20, 2)
    real_rm = store.fs.rm

    def cut_short(path, recursive=False, **kw):
        if recursive:
            raise KeyboardInterrupt("killed mid-delete")
        return real_rm(path, recursive=recursive, **kw)

    monkeypatch.setattr(store.fs, "rm", cut_short)
    with pytest.raises(KeyboardInterrupt):
        store.remove([doomed])
    monkeypatch.setattr(store.fs, "rm", real_rm)
    assert store.exists(doomed, "model.pt"), "the delete was cut short"
    assert store.latest() == keep and resolve_resume(store, "auto")[1] == keep
    _save(store, 30, 3)
    store.prune("step", keep=2)
    assert not store.exists(doomed, "model.pt"), "the half-deleted directory is pruned like a partial save"
