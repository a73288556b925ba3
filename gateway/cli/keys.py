"""``aai-gateway keys new``: a new gateway key for managed mode, shown once, and the config
line (its SHA-256 only) that admits it."""

from __future__ import annotations

import argparse
import json
import sys

from pydantic import ValidationError

from ..config import Project


def cmd_keys_new(args: argparse.Namespace) -> int:
    from ..identity import key_digest, new_key

    try:
        Project.model_validate({"name": args.project, "keys": [{"name": args.name, "sha256": "0" * 64}]})
    except ValidationError as exc:
        print(f"aai-gateway: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}", file=sys.stderr)
        return 2
    key = new_key()
    print("The key (shown once: give it to the client; the gateway keeps only its hash):")
    print(f"  {key}")
    print(f"Add it to the config under the project {args.project!r} (then SIGHUP or POST /admin/v1/reload):")
    print("projects:")
    print(f"  - name: {args.project}")
    print("    keys:")
    print(f'      - {{name: {json.dumps(args.name)}, sha256: "{key_digest(key)}"}}')
    return 0
