"""``python -m proxy -c FILE``: the same as ``bgproxy serve -c FILE``.

The data plane never imports the control plane, so this resolves the installed
``bgproxy`` console script through its entry point and runs it with ``serve``.
"""

from __future__ import annotations

import sys
from importlib.metadata import entry_points


def main() -> int:
    (ep,) = entry_points(group="console_scripts", name="bgproxy")
    result: int = ep.load()(["serve", *sys.argv[1:]])
    return result


if __name__ == "__main__":
    sys.exit(main())
