"""loaders.atomic: the one atomic writer (manifests, checkpoints, exports, embeddings)."""

from __future__ import annotations

import errno
import json
import os

import pytest

from loaders.atomic import DiskFullError, write_atomic, write_json_atomic


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_the_written_file_has_the_mode_the_umask_allows(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        path = write_json_atomic(tmp_path / "manifest.json", {"a": [1, 2]})
    finally:
        os.umask(previous)
    assert os.stat(path).st_mode & 0o777 == mode
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]  # no temporary left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "ckpt.pt"
    target.write_bytes(b"old")

    def full_disk(stream):
        stream.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError, match="disk full while writing .*ckpt.pt"):
        write_atomic(target, full_disk)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_checkpoint_and_manifest_use_the_same_writer():
    import ecomaug.checkpoint
    import loaders.manifest

    assert ecomaug.checkpoint.write_atomic is write_atomic
    assert loaders.manifest.write_json_atomic is write_json_atomic
