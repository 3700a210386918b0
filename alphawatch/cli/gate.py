"""`gate`: a run's verdict from the REST API, as an exit code for CI."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, Any

from alphawatch.cli.common import EXIT_ERROR, EXIT_FAIL, EXIT_OK

if TYPE_CHECKING:
    from alphawatch.integrations.link import Client

# The server's bound on one request's wait (GateQuery.wait_s); longer waits are several requests.
MAX_WAIT_S = 60.0


def run_gate(args: argparse.Namespace) -> int:
    # Imported here: http.client and email cost ~20 ms that no other command needs.
    from alphawatch.integrations.link import Client, LinkError

    params: dict[str, object] = {}
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
        verdict = _verdict(client, run_id, params, args.timeout if args.wait else None)
    except LinkError as exc:
        print(f"alphawatch gate: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(json.dumps(verdict, indent=2))
    if args.wait and verdict.get("pending"):
        what = "any step" if args.step is None else f"step {args.step}"
        print(
            f"alphawatch gate: timed out after {args.timeout:g} s waiting for {what} of run "
            f"{run_id} to be analysed",
            file=sys.stderr,
        )
        return EXIT_ERROR
    if verdict.get("passed"):
        return EXIT_OK
    for violation in verdict.get("violations", []):
        print(f"gate: {violation.get('message', violation)}", file=sys.stderr)
    return EXIT_FAIL


def _verdict(
    client: Client, run_id: int, params: dict[str, object], timeout_s: float | None
) -> dict[str, Any]:
    """The verdict; with ``timeout_s``, long polls until it is not pending or the time is up."""
    if timeout_s is None:
        return client.gate(run_id, params)
    deadline = time.monotonic() + timeout_s
    while True:
        asked = time.monotonic()
        verdict = client.gate(run_id, params, wait_s=max(0.0, min(MAX_WAIT_S, deadline - asked)))
        if not verdict.get("pending") or time.monotonic() >= deadline:
            return verdict
        # A server that caps waits low (gate_wait_max_s) answers at once: do not hammer it.
        time.sleep(max(0.0, min(1.0 - (time.monotonic() - asked), deadline - time.monotonic())))
