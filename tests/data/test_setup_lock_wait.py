"""A task of a multi-task preprocessing run that finds the work folder's lock held by a process on
another host waits for it (up to LOCK_STALE_S, 10 min, if that holder is dead): it says so, once,
naming the holder, instead of hanging without a word."""

from __future__ import annotations

import json
import threading
import time

from dense_model import procutil
from dense_model.data.preprocess.claims import owner
from dense_model.data.preprocess.workdir import locked


def test_a_task_waiting_for_the_setup_lock_says_once_whom_it_waits_for(tmp_path):
    lock = tmp_path / "lock"
    holder = {**owner("the work folder's lock"), "host": "node-that-is-not-us", "pid": 4242}
    lock.write_text(json.dumps(holder))  # fresh heartbeat: live as far as this host can tell
    said = []

    def release_soon():
        time.sleep(1.0)  # five polls of the waiting task
        lock.unlink()

    releaser = threading.Thread(target=release_soon)
    releaser.start()
    with locked(str(tmp_path), wait=True, say=said.append):
        assert json.loads(lock.read_text())["pid"] == owner("")["pid"]
    releaser.join()
    assert said == [
        f"waiting for {lock} (held by pid 4242 on node-that-is-not-us since {holder['since']}); a holder "
        "gone from this host is taken over at once, one on another host or container once its heartbeat "
        f"is {procutil.LOCK_STALE_S / 60:g} min old"
    ]
    with locked(str(tmp_path), wait=True, say=said.append):  # free: nothing said
        pass
    assert len(said) == 1 and not lock.exists()
