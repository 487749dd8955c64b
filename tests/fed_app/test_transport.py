"""transport='files': a client that cannot read the server's files is told why; a killed server's
folder is removed by the next one."""

import pytest
from flwr.app import ConfigRecord, RecordDict

from fed_app.transport import SharedFiles, TransportError, take


def test_a_client_on_another_machine_is_told_to_use_messages(tmp_path):
    content = RecordDict({"arrays-file": ConfigRecord({"path": str(tmp_path / "gone.pt"), "bytes": 12})})
    with pytest.raises(TransportError, match=r"transport='files' needs every client on the server's machine; "
                                             r"pass --run-config \"transport='messages'\""):
        take(content, "arrays")


def test_a_killed_servers_payload_folder_is_removed_by_the_next_one():
    dead = SharedFiles("test-stale", 10**6)
    stale = dead.root.with_name("fedit-test-stale-999999999")  # no such process
    dead.root.rename(stale)
    (stale / "arrays-x.pt").write_bytes(b"0" * 10)
    fresh = SharedFiles("test-stale", 10**6)
    assert not stale.exists() and fresh.root.exists()
    fresh.close()
