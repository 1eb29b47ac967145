"""The `dalle-fast` console command: one entry for every command of the package.

dalle-fast train-dvae ...     python -m dalle_fast.train_dvae ...
dalle-fast train-dalle ...    python -m dalle_fast.train_dalle ...
dalle-fast generate ...       python -m dalle_fast.generate ...
dalle-fast mask-picture ...   python -m dalle_fast.mask_picture ...
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train-dvae": "dalle_fast.train_dvae",
    "train-dalle": "dalle_fast.train_dalle",
    "generate": "dalle_fast.generate",
    "demo": "dalle_fast.demo",
    "mask-picture": "dalle_fast.mask_picture",
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\ndalle-fast: unknown command {argv[0]!r}; expected one of {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        return 0 if argv else 2
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
