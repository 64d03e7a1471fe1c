import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_generated_stubs_match_the_proto_files() -> None:
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen_proto.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_layout_imports_as_one_namespace() -> None:
    import veilface.client
    import veilface.crypto
    import veilface.federated
    import veilface.proto.v1.veilface_pb2
    import veilface.server

    assert veilface.proto.v1.veilface_pb2.DESCRIPTOR.package == "veilface.v1"
    for module in (veilface.client, veilface.crypto, veilface.federated, veilface.server):
        assert module.__name__.startswith("veilface.")


# What users could import by a bare name from us: nothing. Checked on the installed
# distribution (its metadata and, for an editable install, its finder's mapping) and
# in a fresh interpreter outside the repository, never through this process's sys.path,
# which `python -m pytest` starts with the repository root (whatever its folder's name).
BARE = ("server", "crypto", "client", "federated", "proto")


def _run(code: str, cwd: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return subprocess.run(
        [sys.executable, *flags, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_distribution_declares_only_the_veilface_package(tmp_path: Path) -> None:
    """The installed distribution's top-level names (metadata, editable finder): veilface only."""
    out = _run(
        """
        import ast, importlib.metadata, json
        from pathlib import Path

        dist = importlib.metadata.distribution("veilface")
        tops = set((dist.read_text("top_level.txt") or "").split())
        for f in dist.files or ():
            top = f.parts[0]
            if top == ".." or top.endswith((".dist-info", ".egg-info")) or top == "__pycache__":
                continue  # console scripts, metadata
            if top.startswith("__editable__"):
                if top.endswith("_finder.py"):  # setuptools' editable finder: MAPPING = {module: folder}
                    for node in ast.parse(Path(str(f.locate())).read_text()).body:
                        target = getattr(node, "target", None) or (getattr(node, "targets", None) or [None])[0]
                        if getattr(target, "id", None) == "MAPPING":
                            tops.update(name.split(".")[0] for name in ast.literal_eval(node.value))
                continue
            tops.add(top.removesuffix(".py"))
        print(json.dumps({"where": str(dist.locate_file("")), "tops": sorted(tops)}))
        """,
        tmp_path,
        "-I",  # the installed distribution, not a source tree's .egg-info on sys.path
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["tops"] == ["veilface"], report


def test_no_bare_role_package_is_importable_outside_the_repository(tmp_path: Path) -> None:
    out = _run(
        f"""
        import importlib.util, json
        from pathlib import Path
        ours = []
        for role in {BARE!r}:
            spec = importlib.util.find_spec("veilface." + role)
            ours += list(spec.submodule_search_locations or [])
        found = {{}}
        for bare in {BARE!r}:
            spec = importlib.util.find_spec(bare)
            if spec is not None:
                found[bare] = [spec.origin or "", *(spec.submodule_search_locations or [])]
        print(json.dumps({{"ours": ours, "found": found}}))
        """,
        tmp_path,
        "-I",  # no PYTHON* variables, no user site, no script or working folder on sys.path
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    ours = [Path(p).resolve() for p in report["ours"]] + [REPO]
    for bare, locations in report["found"].items():  # something else's package of that name is fine
        for location in filter(None, locations):
            where = Path(location).resolve()
            assert not any(where == root or root in where.parents for root in ours), (bare, where)


def test_role_packages_refuse_their_bare_name_from_the_repository_root() -> None:
    """From the repository root ``import server`` finds ./server/: it must fail, clearly."""
    out = _run(
        """
        import json, sys
        errors = {}
        for bare in ("server", "crypto", "client", "federated"):
            try:
                __import__(bare)
            except ImportError as exc:
                errors[bare] = str(exc)
            assert bare not in sys.modules, bare
        import veilface.crypto.keystore  # the real packages are untouched
        print(json.dumps(errors))
        """,
        REPO,  # `python -c` puts the working folder first on sys.path
    )
    assert out.returncode == 0, out.stderr
    errors = json.loads(out.stdout)
    assert set(errors) == {"server", "crypto", "client", "federated"}, errors
    for bare, message in errors.items():
        assert f"import veilface.{bare}" in message and "repository root" in message, message
