"""Every file the package writes appears whole or not at all (lavis_medblip.storage)."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from lavis_medblip.storage import ArrayStore, atomic_file, atomic_save


def test_a_writer_killed_halfway_leaves_the_previous_checkpoint_intact(tmp_path):
    path = tmp_path / "checkpoint_latest.pth"
    atomic_save({"epoch": 1, "weights": torch.arange(4.0)}, path)
    killed_halfway = textwrap.dedent(f"""
        import os, signal
        from lavis_medblip.storage import atomic_file
        with atomic_file({str(path)!r}) as handle:
            handle.write(b"half of a new checkpoint")
            handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    result = subprocess.run([sys.executable, "-c", killed_halfway], timeout=120)
    assert result.returncode == -signal.SIGKILL

    previous = torch.load(path, weights_only=True)
    assert previous["epoch"] == 1 and torch.equal(previous["weights"], torch.arange(4.0))


def test_a_failing_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("id,prediction\nsub-01,AD\n")
    with pytest.raises(RuntimeError, match="scan 3 failed"):
        with atomic_file(path, "w", encoding="utf-8") as handle:
            handle.write("id,prediction\n")
            raise RuntimeError("scan 3 failed")
    assert path.read_text() == "id,prediction\nsub-01,AD\n"
    assert [entry.name for entry in tmp_path.iterdir()] == ["results.csv"]


def test_a_new_file_keeps_the_permissions_of_the_one_it_replaces(tmp_path):
    path = tmp_path / "shared.pth"
    path.write_bytes(b"old")
    path.chmod(0o640)
    atomic_save({"epoch": 2}, path)
    assert path.stat().st_mode & 0o777 == 0o640


def test_array_store_round_trip_and_damaged_entries_read_as_missing(tmp_path):
    store = ArrayStore(tmp_path / "cache")
    array = np.linspace(0, 1, 24, dtype=np.float16).reshape(2, 3, 4)
    store.save("ab12", array)
    store.save_json("ab12", {"degenerate_warnings": []})
    assert store.path("ab12") == tmp_path / "cache" / "ab" / "ab12.npy"
    np.testing.assert_array_equal(store.load("ab12"), array)
    assert store.load_json("ab12") == {"degenerate_warnings": []}

    assert store.load("cd34") is None  # never written
    store.path("ab12").write_bytes(b"")  # e.g. a disk that filled up mid-copy
    assert store.load("ab12") is None
