"""SEAL objects to and from bytes through an anonymous in-memory file, never a named one."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from veilface.crypto import seal_io
from veilface.crypto.keys import TenantKeys
from veilface.errors import InvalidCiphertext

needs_memfd = pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="Linux memfd only")


class _Spy:
    """Stands in for a SEAL object: records the path SEAL would open and what it finds there."""

    def __init__(self, payload: bytes = b"") -> None:
        self.payload = payload
        self.paths: list[str] = []
        self.links: list[str] = []
        self.inodes: list[int] = []
        self.loaded: bytes | None = None

    def _seen(self, path: str) -> None:
        self.paths.append(path)
        self.links.append(os.readlink(path) if os.path.islink(path) else path)

    def save(self, path: str) -> None:
        self._seen(path)
        with open(path, "wb") as fh:  # SEAL's std::ofstream: open for writing, truncating
            fh.write(self.payload)
            self.inodes.append(os.fstat(fh.fileno()).st_ino)

    def load(self, path: str) -> None:
        self._seen(path)
        with open(path, "rb") as fh:
            self.loaded = fh.read()
            self.inodes.append(os.fstat(fh.fileno()).st_ino)


def _run(script: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        check=False,
    )


@needs_memfd
def test_seal_sees_an_anonymous_memory_file() -> None:
    spy = _Spy(b"secret key bytes" * 100)
    assert seal_io.to_bytes(spy) == spy.payload
    (path,) = spy.paths
    assert path.startswith("/proc/self/fd/")
    assert spy.links[0].startswith("/memfd:")  # linked in no directory
    fd = int(path.rsplit("/", 1)[1])
    assert os.fstat(fd).st_size == 0  # emptied once read back

    target = _Spy()
    assert seal_io._load_into(target, b"ciphertext bytes" * 10, None, "thing") is target
    assert target.loaded == b"ciphertext bytes" * 10
    assert target.links[0].startswith("/memfd:") and os.fstat(fd).st_size == 0


@needs_memfd
def test_a_shorter_object_after_a_longer_one_reads_only_itself() -> None:
    assert seal_io.to_bytes(_Spy(b"L" * 5000)) == b"L" * 5000
    assert seal_io.to_bytes(_Spy(b"s" * 20)) == b"s" * 20
    target = _Spy()
    seal_io._load_into(target, b"A" * 4000, None, "thing")
    seal_io._load_into(target, b"B" * 17, None, "thing")
    assert target.loaded == b"B" * 17


def test_secret_key_is_serialized_without_any_file(tmp_path: Path) -> None:
    """A fresh process makes keys and round-trips the secret key: /dev/shm and $TMPDIR stay empty."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = _run(
        """
        import json, os, tempfile
        from pathlib import Path

        def listing():
            shm = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
            tmp = set(os.listdir("/tmp"))
            return shm, tmp

        shm0, tmp0 = listing()
        from veilface.crypto.keys import TenantKeys
        keys = TenantKeys.generate(16)
        sk = keys.secret_key_bytes()
        back = TenantKeys.from_secret_bytes(sk, dim=16, param_set=keys.param_set.name)
        assert back.secret_key_bytes() == sk
        shm1, tmp1 = listing()
        print(json.dumps({
            "shm": sorted(n for n in shm1 - shm0 if "veilface" in n or "seal" in n),
            "tmp": sorted(n for n in tmp1 - tmp0 if "veilface" in n or "seal" in n),
            "tmpdir": os.listdir(tempfile.gettempdir()),
        }))
        """,
        env={"TMPDIR": str(tmp)},
    )
    assert out.returncode == 0, out.stderr
    created = json.loads(out.stdout.strip().splitlines()[-1])
    if hasattr(os, "memfd_create"):
        assert created == {"shm": [], "tmp": [], "tmpdir": []}


def test_round_trip_of_real_seal_objects() -> None:
    keys = TenantKeys.generate(16)
    sk = keys.secret_key_bytes()
    again = seal_io.load_secret_key(keys.context, sk)
    assert seal_io.to_bytes(again) == sk
    params = seal_io.to_bytes(keys.param_set.seal_parameters())
    assert seal_io.to_bytes(seal_io.load_parameters(params)) == params


def test_bad_input_is_invalid_ciphertext() -> None:
    keys = TenantKeys.generate(16)
    with pytest.raises(InvalidCiphertext, match="truncated"):
        seal_io.load_ciphertext(keys.context, b"short")
    with pytest.raises(InvalidCiphertext, match="must be bytes"):
        seal_io.load_ciphertext(keys.context, "not bytes")
    with pytest.raises(InvalidCiphertext, match="malformed"):
        seal_io.load_ciphertext(keys.context, os.urandom(4096))
    # the scratch file is reusable after a failed load
    sk = keys.secret_key_bytes()
    assert seal_io.to_bytes(seal_io.load_secret_key(keys.context, sk)) == sk


def test_threads_do_not_share_a_scratch_file() -> None:
    errors: list[str] = []
    inodes: set[int] = set()
    lock = threading.Lock()
    barrier = threading.Barrier(6)

    def work(i: int) -> None:
        barrier.wait()
        rng = np.random.default_rng(i)
        for _ in range(50):
            payload = rng.bytes(int(rng.integers(16, 20000)))
            spy = _Spy(payload)
            if seal_io.to_bytes(spy) != payload:
                errors.append(f"save {i}")
            target = _Spy()
            seal_io._load_into(target, payload, None, "thing")
            if target.loaded != payload:
                errors.append(f"load {i}")
            with lock:
                inodes.update(spy.inodes + target.inodes)
        barrier.wait()  # every thread (and its memfd) alive until all are done

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    if hasattr(os, "memfd_create"):
        assert len(inodes) == 6  # one memfd per thread, reused by its calls


@needs_memfd
def test_a_forked_child_gets_its_own_memory_file() -> None:
    """After fork the parent's memfd is shared with the child; the child must not reuse it."""
    out = _run(
        """
        import os, sys
        from veilface.crypto import seal_io

        class Spy:
            def save(self, path):
                with open(path, "wb") as fh:
                    fh.write(b"x" * 64)
                    self.inode = os.fstat(fh.fileno()).st_ino

        parent = Spy(); seal_io.to_bytes(parent)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            child = Spy(); ok = seal_io.to_bytes(child) == b"x" * 64
            os.write(w, f"{child.inode} {ok}".encode()); os._exit(0)
        os.waitpid(pid, 0)
        inode, ok = os.read(r, 100).decode().split()
        again = Spy(); seal_io.to_bytes(again)
        print(parent.inode, inode, ok, again.inode)
        """
    )
    assert out.returncode == 0, out.stderr
    parent, child, ok, again = out.stdout.split()
    assert ok == "True" and child != parent and again == parent


def test_fallback_without_memfd(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Where memfd_create is absent: a private 0700 directory, files unlinked at once, logged once."""
    monkeypatch.setattr(seal_io, "_memfd_available", lambda: False)
    monkeypatch.setattr(seal_io, "_fallback_warned", False)
    monkeypatch.setattr(seal_io, "_dir", None)
    monkeypatch.setattr(seal_io.tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(seal_io, "_shm_base", lambda: None)
    with caplog.at_level(logging.WARNING, logger=seal_io.__name__):
        spy = _Spy(b"abc" * 10)
        assert seal_io.to_bytes(spy) == b"abc" * 10
        target = _Spy()
        seal_io._load_into(target, b"def" * 10, None, "thing")
        assert target.loaded == b"def" * 10
    (scratch,) = list(tmp_path.iterdir())
    assert scratch.name.startswith("veilface-seal-") and (scratch.stat().st_mode & 0o777) == 0o700
    assert list(scratch.iterdir()) == []  # every file unlinked after use
    assert Path(spy.paths[0]).parent == scratch
    warnings = [r for r in caplog.records if "memfd" in r.getMessage()]
    assert len(warnings) == 1
