"""The app's packed files, copied without walking ignored folders, are exactly the files Flower's own `flwr run`
would pack: the same FAB."""

import os

from flwr.cli.build import build_fab_from_disk
from flwr.cli.utils import collect_files, filter_paths_for_publish

from fed_app.local.app_files import app_files, copy_app
from fed_app.local.local_federation import APP_DIR


PYPROJECT = """[project]
name = "x"
version = "1.0.0"

[tool.flwr.app]
publisher = "p"

[tool.flwr.app.components]
serverapp = "pkg.a:app"
clientapp = "pkg.a:app"
"""


def _flowers_pick(app):
    return filter_paths_for_publish(collect_files(app))


def test_the_files_are_flowers_own_pick_in_an_app_with_every_kind_of_ignored_path(tmp_path):
    app = tmp_path / "app"
    files = {"pyproject.toml": PYPROJECT, ".gitignore": ".venv/\nresults/*\n!results/README.md\ndata/\n*.log\n",
             "pkg/a.py": "", "pkg/sub/b.py": "", "pkg/__pycache__/a.cpython-311.py": "", "pkg/notes.md": "",
             "pkg/image.png": "", ".venv/lib/site.py": "", "results/README.md": "", "results/run/rows.jsonl": "",
             "data/d.json": "", "run.log": "", "tests/test_a.py": "", "docs/x.yaml": ""}
    for rel, text in files.items():
        (app / rel).parent.mkdir(parents=True, exist_ok=True)
        (app / rel).write_text(text)
    os.symlink(app / "pkg" / "a.py", app / "pkg" / "link.py")
    picked = app_files(app)
    assert picked == _flowers_pick(app)
    assert "results/README.md" in picked and "pkg/sub/b.py" in picked and "pkg/link.py" not in picked
    copy = copy_app(app, tmp_path / "copy")
    assert build_fab_from_disk(copy) == build_fab_from_disk(app)  # the same bytes, so the same hash


def test_the_fedit_app_packs_the_same_files_as_flower_walking_the_whole_clone():
    assert app_files(APP_DIR) == _flowers_pick(APP_DIR)
