"""Choosing a checkpoint: the newest intact one whatever `latest` says, a corrupt manifest of any
kind is not intact, none intact stops the run (listing what was found), and nothing is rotated
away or replaced while it is the newest intact one."""
import json

import pytest

from engine.state.checkpoint_store import CheckpointError, CheckpointStore, StorageError, verify
from engine.state.manifest import FORMAT_VERSION, file_sha256, parse_manifest, ManifestError, verification_share
from engine.state.resume import choose_checkpoint


def _save(store, step, payload=b"weights", owners=None):
    partial = store.new_partial(step)
    (partial / "__0_0.distcp").write_bytes(payload * 100)
    (partial / "__1_0.distcp").write_bytes(payload * 50)
    (partial / ".metadata").write_bytes(b"meta")
    digests = None
    if owners:
        digests = {name: {"bytes": (partial / name).stat().st_size, "sha256": file_sha256(partial / name), "rank": r}
                   for name, r in owners.items()}
    return store.publish(partial, step, {"note": f"step {step}"}, digests=digests)


def test_latest_naming_a_missing_older_step_does_not_hide_newer_intact_checkpoints(tmp_path):
    store = CheckpointStore(tmp_path, keep=5)
    for step in (10, 15, 20):
        _save(store, step)
    (tmp_path / "latest").write_text("step_00000005\n")  # a step that is gone
    reports = []
    chosen = store.latest_good(report=reports.append)
    assert chosen.step == 20
    assert reports == ["`latest` names step_00000005, which does not exist, but the newest intact checkpoint is "
                       "step_00000020: using step_00000020"]


def test_latest_pointing_back_is_overruled_by_a_newer_intact_checkpoint(tmp_path):
    store = CheckpointStore(tmp_path, keep=5)
    _save(store, 1)
    _save(store, 2)
    (tmp_path / "latest").write_text("step_00000001\n")  # e.g. a crash between the rename and `latest`
    reports = []
    assert store.latest_good(report=reports.append).step == 2
    assert "`latest` names step_00000001, but the newest intact checkpoint is step_00000002" in reports[0]


@pytest.mark.parametrize("manifest, reason", [
    (b"\xff\xfe{not utf-8", "not valid JSON (UnicodeDecodeError"),
    (b"{}", "lacks step, metadata, files"),
    (b"[]", "holds a list, not an object"),
    (b'{"step": 2, "metadata": {}, "files": {"a": {"bytes": 1}}}', "gives a no SHA-256"),
    (b'{"step": 2, "metadata": {}, "files": {"../x": {"bytes": 1, "sha256": "' + b"0" * 64 + b'"}}}',
     "is not a file inside the checkpoint"),
    (b'{"format": 99, "step": 2, "metadata": {}, "files": {}}', "format 99, newer than this Apogee reads"),
    (b'{"step": "2", "metadata": {}, "files": {}}', "step='2' is not a step number"),
], ids=["bad-bytes", "empty-object", "list", "no-checksum", "escapes", "future-format", "step-string"])
def test_a_corrupt_manifest_of_any_kind_is_not_intact_and_the_older_one_is_used(tmp_path, manifest, reason):
    store = CheckpointStore(tmp_path, keep=3)
    _save(store, 1)
    newest = _save(store, 2)
    (newest.path / "manifest.json").write_bytes(manifest)
    problem = verify(newest.path)
    assert problem is not None and reason in problem
    reports = []
    assert store.latest_good(report=reports.append).step == 1
    assert reason in reports[0] and "step_00000002 is not usable" in reports[0]


def test_none_intact_stops_the_run_listing_what_was_found(tmp_path):
    store = CheckpointStore(tmp_path, keep=3)
    for step in (1, 2):
        info = _save(store, step)
        (info.path / "__0_0.distcp").write_bytes(b"x")
    (tmp_path / "step_00000002" / "manifest.json").write_text("{}")
    with pytest.raises(CheckpointError) as refused:
        choose_checkpoint("auto", store, report=lambda _: None)
    message = str(refused.value)
    assert "has checkpoints but none is intact" in message
    assert "step_00000002: manifest.json lacks step, metadata, files" in message
    assert "step_00000001: __0_0.distcp has 1 bytes, the manifest says 700" in message
    assert "--overwrite" in message and "--run-dir" in message
    # the quick check the launcher makes (sizes, no hashing) finds the same
    with pytest.raises(CheckpointError, match="none is intact"):
        choose_checkpoint("auto", store, report=lambda _: None, hashes=False)


def test_resume_never_where_checkpoints_exist_is_refused_with_how_to_start_over(tmp_path):
    store = CheckpointStore(tmp_path, keep=3)
    _save(store, 10)
    _save(store, 15)
    with pytest.raises(CheckpointError) as refused:
        choose_checkpoint("never", store)
    assert "already holds checkpoints (steps 10, 15)" in str(refused.value)
    assert "new --run-dir" in str(refused.value) and "--overwrite" in str(refused.value)
    assert choose_checkpoint("never", CheckpointStore(tmp_path / "empty")) is None


def test_retention_never_removes_the_newest_intact_checkpoint(tmp_path):
    store = CheckpointStore(tmp_path, keep=3)
    for step in (10, 15, 20):
        _save(store, step)
    for step in (10, 15, 20):  # all damaged; a run started over from step 0 in the same checkpoint.dir
        (tmp_path / f"step_{step:08d}" / "__0_0.distcp").write_bytes(b"x")
    fresh = _save(store, 2)
    assert {i.step for i in store.published()} == {2, 10, 15, 20}  # the newest intact (2) is kept
    assert verify(fresh.path) is None and store.latest_good(report=lambda _: None).step == 2
    for step in (3, 4, 5):
        _save(store, step)
    # keep=3 counts from the newest published: 3, 4, 5; the later, damaged steps are not this run's to judge
    assert {i.step for i in store.published()} == {3, 4, 5, 10, 15, 20}
    assert store.latest_good(report=lambda _: None).step == 5


def test_the_same_step_published_again_replaces_the_old_one_only_once_the_new_is_in_place(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path, keep=3)
    old = _save(store, 5, payload=b"old")
    partial = store.new_partial(5)
    (partial / "__0_0.distcp").write_bytes(b"new")
    real_rename = __import__("os").rename

    def fail_second_rename(src, dst):
        if str(src).endswith(".partial-" + partial.name.split(".partial-")[1]):
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)
    monkeypatch.setattr("engine.state.checkpoint_store.os.rename", fail_second_rename)
    with pytest.raises(StorageError):
        store.publish(partial, 5)
    assert verify(old.path) is None and (old.path / "__0_0.distcp").read_bytes() == b"old" * 100
    assert not partial.exists() and not list(tmp_path.glob("*.replaced-*"))


def test_the_manifest_records_each_file_with_the_rank_that_wrote_it(tmp_path):
    store = CheckpointStore(tmp_path, keep=3)
    info = _save(store, 1, owners={"__0_0.distcp": 0, "__1_0.distcp": 1, ".metadata": 0})
    manifest = json.loads((info.path / "manifest.json").read_text())
    assert manifest["format"] == FORMAT_VERSION == 2
    assert {n: e["rank"] for n, e in manifest["files"].items()} == {"__0_0.distcp": 0, "__1_0.distcp": 1,
                                                                    ".metadata": 0}
    parsed = parse_manifest((info.path / "manifest.json").read_bytes())
    assert verification_share(parsed, 0, 2) == [".metadata", "__0_0.distcp"]
    assert verification_share(parsed, 1, 2) == ["__1_0.distcp"]
    assert verification_share(parsed, 0, 1) == sorted(parsed["files"])
    # a world the writers do not fit: dealt out by size, every file exactly once
    shares = [verification_share(parsed, r, 3) for r in range(3)]
    assert sorted(n for share in shares for n in share) == sorted(parsed["files"])


def test_a_format_1_manifest_is_still_verified(tmp_path):
    store = CheckpointStore(tmp_path, keep=3)
    info = _save(store, 1)
    manifest = json.loads((info.path / "manifest.json").read_text())
    del manifest["format"]
    for entry in manifest["files"].values():
        del entry["rank"]
    (info.path / "manifest.json").write_text(json.dumps(manifest))
    assert verify(info.path) is None
    parsed = parse_manifest((info.path / "manifest.json").read_bytes())
    assert parsed["format"] == 1
    shares = [verification_share(parsed, r, 2) for r in range(2)]
    assert sorted(shares[0] + shares[1]) == sorted(parsed["files"]) and all(shares)
    (info.path / "__1_0.distcp").write_bytes(b"weightz" * 50)
    assert verify(info.path) == "__1_0.distcp does not match its checksum"


def test_parse_manifest_names_the_problem():
    with pytest.raises(ManifestError, match="lists no files"):
        parse_manifest(b'{"step": 1, "metadata": {}, "files": {}}')
