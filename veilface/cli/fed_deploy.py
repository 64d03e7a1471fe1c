"""``veilface fed deploy-local``: a local Flower Deployment Engine with TLS and node auth.

Starts ``flower-superlink`` (TLS, SuperNode authentication) and N
``flower-supernode`` processes on 127.0.0.1 through
:class:`veilface.federated.deploy.LocalDeployment`, then either runs the
project's apps once (``--run``, with ``--run-config key=value`` overrides) and
stops, or keeps the deployment up until Ctrl-C so that ``flwr`` commands can be
tried against it (the printed ``FLWR_HOME`` holds the connection).

It adds ``deploy-local`` under the ``fed`` command (created here when no other
module registered ``fed``), so it must come after ``veilface.cli.fed`` in
``_COMMAND_MODULES``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import tomllib

from veilface.errors import InvalidArgument


def _subparsers_of(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:  # type: ignore[type-arg]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return parser.add_subparsers(dest="fed_command", required=True)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``fed deploy-local`` (and ``fed`` itself when absent)."""
    fed = sub.choices.get("fed")
    if fed is None:
        fed = sub.add_parser("fed", help="federated training (Flower)")
    fed_sub = _subparsers_of(fed)
    p = fed_sub.add_parser(
        "deploy-local",
        help="start a local TLS + node-auth Flower deployment (SuperLink + SuperNodes)",
        description="Start flower-superlink with TLS and SuperNode authentication and N "
        "flower-supernode processes on 127.0.0.1 (free ports, certificates and node keys "
        "generated into --work-dir). With --run, run the veilface apps once and stop; "
        "otherwise stay up until Ctrl-C.",
    )
    p.add_argument(
        "--work-dir",
        type=Path,
        default=Path("runs/fed-deploy"),
        help="certificates, keys, FLWR_HOME and logs (runs/fed-deploy)",
    )
    p.add_argument(
        "--supernodes",
        type=int,
        default=None,
        help="SuperNodes to start (default: what the task and protocol need: 4 for "
        "vireid camera isolation, the default; 2 for entity-isolation/-sharing and pad)",
    )
    p.add_argument("--run", action="store_true", help="run the apps once, then stop")
    p.add_argument(
        "--run-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run-config override, TOML value (repeatable), e.g. "
        "--run-config \"task='vireid'\" --run-config num-server-rounds=2",
    )
    p.add_argument(
        "--node-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra --node-config entry for every SuperNode (repeatable)",
    )
    p.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds before the run is stopped (1800)"
    )
    p.add_argument("--json", type=Path, help="write the outcome as JSON to this file")
    p.set_defaults(func=run_deploy_local)  # fmt: skip


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["a=1", "b='x'"]`` -> ``{"a": 1, "b": "x"}`` (values parsed as TOML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise InvalidArgument(f"expected KEY=VALUE, got {item!r}")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError as exc:
            raise InvalidArgument(
                f"{key.strip()}: {raw!r} is not a TOML value; quote strings, e.g. "
                f"{key.strip()}='{raw.strip()}'"
            ) from exc
        out[key.strip()] = value
    return out


def _plan(args: argparse.Namespace, work_dir: Path) -> tuple[dict[str, Any], dict[str, Any], int]:
    """The run-config overrides (with a default ``out-dir``), the effective config and
    the SuperNode count (checked against the config when ``--run``)."""
    from veilface.federated.deploy import check_supernodes, default_supernodes, project_run_config

    run_config = parse_overrides(args.run_config)
    effective = {**project_run_config(), **run_config}
    if args.run and not str(effective.get("out-dir", "")):
        # a run that trains leaves a model behind: a fresh folder per run
        out = work_dir / "out" / time.strftime("run-%Y%m%d-%H%M%S")
        run_config["out-dir"] = effective["out-dir"] = str(out)
    if args.supernodes is None:
        supernodes = default_supernodes(effective)
    else:
        supernodes = int(args.supernodes)
        if supernodes < 1:
            raise InvalidArgument("--supernodes must be >= 1")
        if args.run:
            check_supernodes(effective, supernodes)
    return run_config, effective, supernodes


def _report_run(outcome: Any, out_dir: str, work_dir: Path) -> dict[str, Any]:
    """Print how the run ended (the ServerApp's error on stderr); the JSON fields."""
    fields: dict[str, Any] = {
        "run_id": outcome.run_id,
        "status": outcome.status,
        "seconds": outcome.seconds,
        "error": outcome.error,
    }
    latest = Path(out_dir) / "checkpoints" / "latest.npz" if out_dir else None
    if outcome.ok:
        print(f"run {outcome.run_id}: {outcome.status} in {outcome.seconds:.1f} s")
        if latest is not None and latest.is_file():
            fields["final_checkpoint"] = str(latest)
            print(f"final model: {latest}")
        if out_dir:
            print(f"metrics and checkpoints: {out_dir}")
    else:
        print(
            f"veilface: error: run {outcome.run_id} {outcome.status} after "
            f"{outcome.seconds:.1f} s: {outcome.error}\nfull log: {work_dir / 'flwr-run.log'}",
            file=sys.stderr,
        )
    return fields


def run_deploy_local(args: argparse.Namespace) -> int:
    """Start the deployment; run once (``--run``) or wait for Ctrl-C; always stop it.

    Returns 0 when the run completed (or, without ``--run``, after Ctrl-C) and
    1 when it failed; the ServerApp's error is printed on stderr.
    """
    from tqdm import tqdm

    from veilface.federated.deploy import CONNECTION_NAME, LocalDeployment

    work_dir = Path(args.work_dir).resolve()
    run_config, effective, supernodes = _plan(args, work_dir)
    node_config = parse_overrides(args.node_config)
    steps = ["start", "run", "stop"] if args.run else ["start"]
    bar = tqdm(total=len(steps), desc="deploy-local", unit="step", file=sys.stderr)
    dep = LocalDeployment(work_dir, num_supernodes=supernodes, node_config=node_config)
    result: dict[str, Any] = {
        "work_dir": str(dep.work_dir),
        "supernodes": supernodes,
        "out_dir": str(effective.get("out-dir", "")),
    }
    try:
        bar.set_postfix_str("starting SuperLink and SuperNodes")
        dep.start()
        bar.update(1)
        result.update(
            {
                "superlink": dep.address,
                "ca_cert": str(dep.tls.ca_cert) if dep.tls else None,
                "flwr_home": str(dep.cli_home),
                "connection": CONNECTION_NAME,
                "pids": dep.pids,
            }
        )
        print(f"SuperLink {dep.address} (TLS, SuperNode auth), {supernodes} SuperNodes")
        print(f"CA certificate: {result['ca_cert']}")
        print(f"Flower CLI: FLWR_HOME={dep.cli_home} flwr supernode ls {CONNECTION_NAME}")
        if args.run:
            bar.set_postfix_str("running the apps")
            outcome = dep.run(run_config, timeout=args.timeout)
            bar.update(1)
            bar.close()
            result.update(_report_run(outcome, str(result["out_dir"]), dep.work_dir))
        else:
            bar.close()
            print("Up. Ctrl-C stops every process.")
            try:
                while True:
                    time.sleep(1.0)
                    dep.check_alive()
            except KeyboardInterrupt:
                pass
    finally:
        dep.stop()
        if not bar.disable:
            bar.update(len(steps) - bar.n)
            bar.close()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if not args.run or str(result.get("status", "")).endswith("completed") else 1
