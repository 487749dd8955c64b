"""The Flower app's files, copied into a folder of their own before `flwr run` packs them.

`flwr run <folder>` walks every file under the folder before it filters them by `.gitignore` and its publish
rules (flwr/cli/utils.py, collect_files): in a clone with its virtualenv inside, 56,000 paths and about 6 s of
a 2-core machine for the 123 files it keeps, at every start. Here the walk skips the folders that `.gitignore`
(or Flower's own excludes) leave out whole, as git does, then the same Flower filter picks the files: the copy
holds exactly what Flower would pack, so the FAB and its hash are the same (tests/fed_app/local/test_app_files.py).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from flwr.cli.utils import build_pathspec, filter_paths_for_publish, load_gitignore_patterns
from flwr.supercore.constant import APP_PUBLISH_EXCLUDE_PATTERNS


def app_files(app: Path) -> dict[str, Path]:
    """The files of `app` that Flower packs into its FAB, by their POSIX path relative to `app`."""
    app = Path(app).resolve()
    gitignore = app / ".gitignore"
    ignored = build_pathspec(tuple(load_gitignore_patterns(gitignore.read_bytes() if gitignore.exists() else b""))
                             + APP_PUBLISH_EXCLUDE_PATTERNS)
    found: dict[str, Path] = {}
    for folder, subfolders, names in os.walk(app, followlinks=False):
        rel = Path(folder).relative_to(app)
        # a folder ignored whole is not entered: git cannot re-include a file under it either
        subfolders[:] = [d for d in subfolders if not ignored.match_file((rel / d).as_posix() + "/")]
        for name in names:
            path = Path(folder) / name
            if not path.is_symlink():  # Flower skips links too
                found[(rel / name).as_posix()] = path
    return filter_paths_for_publish(found)


def copy_app(app: Path, into: Path) -> Path:
    """`into` holding exactly the files of `app` that Flower packs (a fresh copy); `into`."""
    shutil.rmtree(into, ignore_errors=True)
    for rel, path in app_files(app).items():
        target = into / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return into
