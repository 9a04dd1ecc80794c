"""``python -m pytest_refract compare A.json B.json [--markdown]``"""

import sys

from .cli.compare import main as compare_main

USAGE = "usage: python -m pytest_refract compare A.json B.json [...] [--markdown]"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] != "compare":
        print(f"error: unknown command {argv[0]!r}\n{USAGE}", file=sys.stderr)
        return 2
    return compare_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
