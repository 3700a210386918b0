"""`gate`: a run's verdict from the REST API, as an exit code for CI."""

from __future__ import annotations

import argparse
import json
import sys

from alphawatch.cli.common import EXIT_ERROR, EXIT_FAIL, EXIT_OK


def run_gate(args: argparse.Namespace) -> int:
    # Imported here: http.client and email cost ~20 ms that no other command needs.
    from alphawatch.integrations.link import Client, LinkError

    params = {}
    for name in (
        "stat",
        "filter",
        "step",
        "ref_step",
        "max_alpha",
        "min_alpha",
        "max_untrusted_share",
        "max_delta",
        "variant",
        "method",
    ):
        value = getattr(args, name)
        if value is not None:
            params[name] = value
    # The training callbacks' client: one way to call the API, and a run found on any page.
    client = Client(args.url, args.token, timeout_s=30.0)
    try:
        if str(args.run).isdigit():
            run_id = int(args.run)
        else:
            found = client.find(str(args.run))
            if found is None:
                print(
                    f"alphawatch gate: no run named {args.run!r} at {client.base}", file=sys.stderr
                )
                return EXIT_ERROR
            run_id = found.id
        verdict = client.gate(run_id, params)
    except LinkError as exc:
        print(f"alphawatch gate: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(json.dumps(verdict, indent=2))
    if verdict.get("passed"):
        return EXIT_OK
    for violation in verdict.get("violations", []):
        print(f"gate: {violation.get('message', violation)}", file=sys.stderr)
    return EXIT_FAIL
