"""Write the human-readable MANIFEST.md beside a shipped .vfpad artifact.

    python scripts/liveness_manifest.py client/liveness/weights/default.vfpad

Everything in it is read from the artifact's own (verified) manifest.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from veilface.nn.liveness_io import read_artifact


def main(path: str) -> None:
    art = read_artifact(path)
    m = art.manifest
    tr, rule = m["training"], m["threshold_rule"]
    lines = [
        f"# {Path(path).name}: the liveness model that ships with veilface",
        "",
        "**Trained on PROXY data**: live LFW photos and rendered print/replay attacks of other",
        "LFW people (`veilface.federated.pad.kiosk_proxy`), not a real PAD data set.",
        "",
        "Made by `veilface fed train --task pad --export client/liveness/weights/default.vfpad`",
        "(defaults; see docs/federated.md, \"The kiosk liveness model\").",
        "",
        "| field | value |",
        "|---|---|",
        f"| fingerprint | `{m['fingerprint']}` |",
        f"| format | {m['format']} v{m['format_version']} |",
        f"| architecture | {m['architecture']['name']} (`{m['architecture']['model_id']}`) |",
        f"| input | {m['input']['crop_scale']} x face box, {m['input']['size']} px RGB |",
        f"| threshold | P(live) >= {m['threshold']:.4f} |",
        (f"| chosen at | BPCER {rule['target_bpcer']:.0%} on {rule['on']} ({rule['images']} images):"
        f" BPCER {rule['bpcer']:.3f}, APCER {rule['apcer']:.3f} |"),
        f"| run id | {tr['run_id']} ({tr['created']}) |",
        (f"| engine | {tr['engine']}; {tr['sites']} sites; {tr['rounds']} rounds"
        f" ({tr['rounds_per_domain']} per domain, {tr['local_epochs']} local epochs) |"),
        f"| method | {tr['method']} |",
        f"| domains | {', '.join(tr['domains'])} |",
        f"| data | {tr['data']} |",
        "",
        "Full manifest:",
        "",
        "```json",
        json.dumps({k: v for k, v in m.items()}, indent=2, sort_keys=True),
        "```",
        "",
    ]
    out = Path(path).with_name("MANIFEST.md")
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1])
