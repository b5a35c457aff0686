"""``celery-operator-plugin``: build a Python module into a celery-operator plugin component,
or write the typed bindings of a world for an editor."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from . import WIT_DIR, WORLDS


def componentize_py(*args: str) -> int:
    # componentize-py's own entry point, in this interpreter (no PATH lookup).
    code = "import sys; from componentize_py import script; sys.argv[0] = 'componentize-py'; sys.exit(script())"
    return subprocess.call([sys.executable, "-c", code, *args])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="celery-operator-plugin", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build APP (a module name) into a component")
    build.add_argument("app", help="the module with the plugin class, e.g. app")
    build.add_argument("--world", choices=sorted(WORLDS), required=True)
    build.add_argument("-o", "--output", required=True, help="the .wasm to write")
    build.add_argument(
        "-p", "--python-path", action="append", default=[],
        help="a directory with the app and its dependencies (default: .)",
    )
    bindings = commands.add_parser("bindings", help="write a world's typed classes")
    bindings.add_argument("--world", choices=sorted(WORLDS), required=True)
    bindings.add_argument("out", help="the directory to write wit_world/ into")
    args = parser.parse_args(argv)

    common = ["-d", str(WIT_DIR), "-w", WORLDS[args.world]]
    if args.command == "bindings":
        return componentize_py(*common, "bindings", args.out)
    # The app's directories, then this SDK's, so the app can import its helpers.
    sdk = str(Path(__file__).resolve().parent.parent)
    paths = [arg for p in [*(args.python_path or ["."]), sdk] for arg in ("-p", p)]
    # --stub-wasi: the component imports no WASI at all (the operator's sandbox grants no
    # files, network or clock; Python's runtime would import them anyway).
    return componentize_py(
        *common, "componentize", "--stub-wasi", *paths, args.app, "-o", args.output
    )


if __name__ == "__main__":
    sys.exit(main())
