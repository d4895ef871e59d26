"""Atomic publishing: a torn or corrupt checkpoint is never loaded; retention keeps the last k."""
import pytest

from engine.state.checkpoint_store import CheckpointError, CheckpointStore, StorageError, read_manifest, verify


def _save(store, step, payload=b"weights"):
    partial = store.new_partial(step)
    (partial / "__0_0.distcp").write_bytes(payload * 100)
    (partial / ".metadata").write_bytes(b"meta")
    return store.publish(partial, step, {"note": f"step {step}"})


def test_publish_renames_writes_manifest_and_points_latest(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt", keep=3)
    info = _save(store, 5)
    assert info.path.name == "step_00000005" and info.step == 5
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step_00000005"
    manifest = read_manifest(info.path)
    assert set(manifest["files"]) == {"__0_0.distcp", ".metadata"} and manifest["metadata"] == {"note": "step 5"}
    assert verify(info.path) is None
    assert not list((tmp_path / "ckpt").glob("*.partial-*"))


def test_retention_keeps_the_last_k(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for step in (1, 2, 3, 4):
        _save(store, step)
    assert [i.step for i in store.published()] == [3, 4]


@pytest.mark.parametrize("damage, reason", [
    (lambda p: (p / "__0_0.distcp").unlink(), "missing file __0_0.distcp"),
    (lambda p: (p / "__0_0.distcp").write_bytes(b"x"), "has 1 bytes"),
    (lambda p: (p / "__0_0.distcp").write_bytes(b"wEights" * 100), "does not match its checksum"),
    (lambda p: (p / "manifest.json").unlink(), "no manifest.json"),
])
def test_a_damaged_latest_is_reported_and_the_previous_good_one_used(tmp_path, damage, reason):
    store = CheckpointStore(tmp_path, keep=3)
    _save(store, 1)
    newest = _save(store, 2)
    damage(newest.path)
    reports = []
    good = store.latest_good(report=reports.append)
    assert good.step == 1
    assert len(reports) == 2 and reason in reports[0] and "step_00000002" in reports[0]
    assert reports[1] == ("`latest` names step_00000002, but the newest intact checkpoint is step_00000001: "
                          "using step_00000001")


def test_an_interrupted_save_is_invisible_and_cleaned_up_later(tmp_path):
    store = CheckpointStore(tmp_path, keep=3)
    _save(store, 1)
    partial = store.new_partial(2)  # the writer died here: no publish
    (partial / "__0_0.distcp").write_bytes(b"half")
    assert store.latest_good().step == 1
    _save(store, 3)
    assert not partial.exists()


def test_no_checkpoint_gives_none(tmp_path):
    assert CheckpointStore(tmp_path / "none").latest_good() is None


def test_unwritable_directory_is_a_clear_error(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the checkpoint directory should go")  # fails even for root
    with pytest.raises(CheckpointError, match=r"checkpoint.dir=.*not-a-dir/ckpt: cannot create step_00000001"):
        CheckpointStore(blocker / "ckpt").new_partial(1)


def test_a_failed_publish_leaves_earlier_checkpoints_untouched(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path, keep=3)
    first = _save(store, 1)
    partial = store.new_partial(2)
    (partial / "__0_0.distcp").write_bytes(b"data")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("engine.state.checkpoint_store.os.rename", disk_full)
    with pytest.raises(StorageError, match="publishing the checkpoint of step 2 failed: no space left .*"
                                           "earlier ones are untouched; a restart cannot fix this"):
        store.publish(partial, 2)
    assert store.latest_good().step == 1 and verify(first.path) is None
    assert not partial.exists()
