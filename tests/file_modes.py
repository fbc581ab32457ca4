"""What every file and folder the toolkit writes must look like to other users of the machine."""

import os
from pathlib import Path


def unreadable_entries(root) -> list[str]:
    """Entries under `root` (and root itself) whose mode is not an ordinary new file's / folder's (0666 / 0777 less
    the umask): safetensors >= 0.8 writes 0600 files and mkdtemp 0700 folders unless the writer fixes them."""
    umask = os.umask(0)
    os.umask(umask)
    root = Path(root)
    bad = []
    for entry in [root, *root.rglob("*")]:
        expected = (0o777 if entry.is_dir() else 0o666) & ~umask
        if entry.stat().st_mode & 0o777 != expected:
            bad.append(f"{entry.relative_to(root.parent)}: {oct(entry.stat().st_mode & 0o777)}")
    return bad
