"""`gcp-storage-emulator start …`, minus its per-write metadata snapshot.

The emulator keeps its state in Python dicts and, after every write, also serialises the metadata of
*every* object it holds into a `.meta` file, which it reads back only when it starts. With
`--in-memory` that file lives in the same process and is never read, yet the serialisation makes each
write cost O(objects held): measured here, 9 ms per small upload at 500 objects and 90 ms at 3,000.
A test session holds tens of thousands (every orbax save is hundreds of objects), so gs:// tests
slowed down the longer the session ran. Requests, responses and stored data are unchanged.
"""

from __future__ import annotations

import sys

from gcp_storage_emulator import __main__ as emulator_cli
from gcp_storage_emulator.storage import Storage


def _keep_in_memory_only(self: Storage) -> None:
    """In memory the dicts are the whole state; nothing reads a snapshot of them back."""


if __name__ == "__main__":
    if "--in-memory" not in sys.argv:
        raise SystemExit("this launcher is for --in-memory emulators only (it drops the snapshot)")
    Storage._write_config_to_file = _keep_in_memory_only  # type: ignore[method-assign]
    sys.exit(emulator_cli.main(sys.argv[1:]))
