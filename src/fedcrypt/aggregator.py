"""Helper aggregators for additive sharing (``mechanism = "shares"``) in a simulation.

A simulation starts each of the job's ``k - 1`` helper aggregators as a child process
(``python -m fedcrypt.aggregator``) that holds its own secret key (made there, or loaded from
``[privacy] keys``), announces its public key and then answers the server's helper stages over
its pipes (:class:`~fedcrypt.transport.pipe.PipeTransport`), with the same
:class:`~fedcrypt.core.helper.HelperAggregator` and message bytes as ``fedcrypt aggregator`` in a
deployment. Nothing but frames is written to its stdout; its logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fedcrypt.core.helper import HelperAggregator
from fedcrypt.crypto.agreement import usable_public_key
from fedcrypt.mechanisms import Options, helper_mechanism, helpers_of
from fedcrypt.transport.pipe import PeerFailed, PipeTransport, read_frame, write_frame

if TYPE_CHECKING:
    from fedcrypt.config.job import JobConfig

log = logging.getLogger(__name__)
MAX_REQUEST_BYTES = 1 << 30


def start_helpers(job: JobConfig, key_dir: Path | None) -> tuple[PipeTransport, dict[str, bytes]]:
    """Start the job's helper aggregators as child processes; returns their transport and their
    announced public keys (which clients seal their seeds to)."""
    privacy = job.privacy
    commands = {
        helper: [
            sys.executable, "-m", "fedcrypt.aggregator",
            "--mechanism", privacy.mechanism,
            "--name", helper,
            "--job", job.job.name,
            "--aggregators", str(privacy.aggregators),
            "--min-clients", str(job.strategy.min_fit_clients),
            *(["--keys", str(key_dir)] if key_dir is not None else []),
        ]
        for helper in helpers_of(privacy.mechanism, privacy.options)
    }
    transport = PipeTransport(commands, timeout=job.deploy.round_timeout)
    keys: dict[str, bytes] = {}
    for helper, data in transport.announcements().items():
        try:
            announced = json.loads(data)
            if isinstance(announced, dict) and isinstance(announced.get("error"), str):
                transport.close()
                raise PeerFailed(f"helper aggregator {helper} could not start: {announced['error']}")
            key = bytes.fromhex(announced["public_key"])
            if announced.get("helper") != helper or not usable_public_key(key):
                raise ValueError
        except (ValueError, KeyError, TypeError, AttributeError):
            transport.close()
            raise PeerFailed(f"helper aggregator {helper} announced no usable public key") from None
        keys[helper] = key
    return transport, keys


def main(argv: list[str] | None = None) -> int:
    """A helper aggregator process: announce the public key, then answer frames until shut down."""
    parser = argparse.ArgumentParser(prog="python -m fedcrypt.aggregator", description=__doc__)
    parser.add_argument("--mechanism", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--job", required=True)
    parser.add_argument("--aggregators", type=int, required=True)
    parser.add_argument("--min-clients", type=int, required=True)
    parser.add_argument("--keys", type=Path)
    args = parser.parse_args(argv)
    out, source = sys.stdout.buffer, sys.stdin.buffer
    sys.stdout = sys.stderr  # stdout carries frames only
    logging.basicConfig(level=logging.WARNING, format=f"{args.name}: %(levelname)s %(message)s")
    try:
        mechanism = helper_mechanism(
            args.mechanism,
            helper=args.name,
            key_dir=args.keys,
            options=Options(aggregators=args.aggregators),
            min_clients=args.min_clients,
        )
    except (ValueError, OSError) as exc:  # a missing or malformed key file: tell the parent why
        write_frame(out, json.dumps({"helper": args.name, "error": str(exc)}).encode())
        return 2
    announcement = {"helper": args.name, "public_key": mechanism.helper_public_key().hex()}
    write_frame(out, json.dumps(announcement).encode())
    helper = HelperAggregator(args.name, args.job, mechanism)
    while not helper.finished:
        try:
            request = read_frame(source, MAX_REQUEST_BYTES)
        except PeerFailed as exc:
            log.error("the server's stream broke: %s", exc)
            return 1
        if request is None:
            return 0
        write_frame(out, helper.handle(request))
    return 0


if __name__ == "__main__":
    sys.exit(main())
