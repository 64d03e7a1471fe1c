import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_generated_stubs_match_the_proto_files() -> None:
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen_proto.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_layout_imports_as_one_namespace() -> None:
    import veilface.client
    import veilface.crypto
    import veilface.federated
    import veilface.proto.v1.veilface_pb2
    import veilface.server

    assert veilface.proto.v1.veilface_pb2.DESCRIPTOR.package == "veilface.v1"
    # nothing installs bare top-level role packages
    for bare in ("server", "crypto", "client", "federated"):
        try:
            __import__(bare)
        except ImportError:
            continue
        mod = sys.modules[bare]
        assert "veilface" not in (getattr(mod, "__file__", "") or ""), bare
