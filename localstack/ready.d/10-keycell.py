"""LocalStack init hook (ready.d): create the cells' tables, keys, buses, queues and
rules from the mounted infra/cells.toml (see ../provision.py)."""

import os
import sys

sys.path.insert(0, "/opt/keycell")
for variable, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}.items():
    os.environ.setdefault(variable, value)

from provision import main  # noqa: E402

main(["--endpoint", "http://localhost:4566", "--cells", "/opt/keycell/cells.toml"])
