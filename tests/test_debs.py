"""The Debian packages of scripts/build-debs.sh: what they contain, with which modes, lintian.

CI builds the packages before pytest (scripts/test.sh); here the module fixture uses
``dist/`` as it is when its Python files match this checkout, and rebuilds it
otherwise, so a test never passes on packages of other code.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

from server.config import load_server_config

ROOT = Path(__file__).resolve().parent.parent
DIST = ROOT / "dist"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
PY = "python3.11"
NOT_SHIPPED = ("server", "harness", "tests", "bench")


def deb_arch() -> str:
    return subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
    ).stdout.strip()


@dataclass(frozen=True)
class Deb:
    path: Path
    members: dict[str, tarfile.TarInfo]
    data: dict[str, bytes]
    control: dict[str, bytes]

    @classmethod
    def read(cls, path: Path) -> Deb:
        members: dict[str, tarfile.TarInfo] = {}
        data: dict[str, bytes] = {}
        fsys = subprocess.run(["dpkg-deb", "--fsys-tarfile", path], capture_output=True, check=True)
        with tarfile.open(fileobj=io.BytesIO(fsys.stdout)) as tar:
            for info in tar:
                name = "/" + info.name.removeprefix("./").rstrip("/")
                members[name] = info
                if info.isfile():
                    extracted = tar.extractfile(info)
                    assert extracted is not None
                    data[name] = extracted.read()
        ctrl = subprocess.run(["dpkg-deb", "--ctrl-tarfile", path], capture_output=True, check=True)
        control: dict[str, bytes] = {}
        with tarfile.open(fileobj=io.BytesIO(ctrl.stdout)) as tar:
            for info in tar:
                extracted = tar.extractfile(info) if info.isfile() else None
                if extracted is not None:
                    control[info.name.removeprefix("./")] = extracted.read()
        return cls(path, members, data, control)

    def field(self, name: str) -> str:
        for line in self.control["control"].decode().splitlines():
            if line.startswith(f"{name}:"):
                return line.split(":", 1)[1].strip()
        raise AssertionError(f"{self.path.name}: no {name} field")

    def site(self, package: str) -> str:
        return f"/usr/lib/{package}/lib/{PY}/site-packages"


def repo_python_files(*packages: str) -> dict[str, bytes]:
    listed = subprocess.run(
        ["git", "ls-files", "--", *packages], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    return {name: (ROOT / name).read_bytes() for name in listed if name.endswith(".py")}


def debs_match_checkout(agent: Path, server: Path) -> bool:
    """True when both .debs hold this checkout's Python files, units and maintainer scripts."""
    if not (agent.exists() and server.exists()):
        return False
    for path, prefix, packages in (
        (agent, "provision-agent", ("agent",)),
        (server, "provision-server", ("agent", "server")),
    ):
        deb = Deb.read(path)
        site = deb.site(prefix)
        shipped = {
            name.removeprefix(site + "/"): body
            for name, body in deb.data.items()
            if name.startswith(site + "/") and name.split("/")[-1].endswith(".py")
            and name.removeprefix(site + "/").split("/")[0] in packages
        }  # fmt: skip
        if shipped != repo_python_files(*packages):
            return False
        source = ROOT / "packaging" / "deb" / prefix
        for script in ("postinst", "prerm", "postrm"):
            if deb.control.get(script) != (source / script).read_bytes():
                return False
        for name, body in deb.data.items():
            unit = ROOT / "systemd" / name.removeprefix("/lib/systemd/system/")
            if name.startswith("/lib/systemd/system/") and body != unit.read_bytes():
                return False
    return True


@dataclass(frozen=True)
class Debs:
    agent: Deb
    server: Deb


@pytest.fixture(scope="module")
def debs() -> Iterator[Debs]:
    arch = deb_arch()
    agent = DIST / f"provision-agent_{VERSION}_{arch}.deb"
    server = DIST / f"provision-server_{VERSION}_{arch}.deb"
    if not debs_match_checkout(agent, server):
        # Built without lintian here; test_lintian_is_clean runs it on the result.
        subprocess.run(["bash", "scripts/build-debs.sh", "--no-lintian"], cwd=ROOT, check=True)
    yield Debs(Deb.read(agent), Deb.read(server))


def test_agent_deb_ships_the_agent_and_nothing_of_server_harness_tests(debs: Debs) -> None:
    deb = debs.agent
    site = deb.site("provision-agent")
    for name in NOT_SHIPPED:
        assert f"{site}/{name}" not in deb.members, name
    shipped = {
        name.removeprefix(site + "/"): body
        for name, body in deb.data.items()
        if name.startswith(f"{site}/agent/")
    }
    assert shipped == repo_python_files("agent")
    assert f"{site}/agent/factory/console.py" in deb.members
    # The bundled runtime: paho-mqtt 2 and cryptography, not Debian's older ones; no pymongo.
    for module in ("paho/mqtt/client.py", "cryptography/__init__.py", "serial/__init__.py",
                   "click/__init__.py", "platformdirs/__init__.py"):  # fmt: skip
        assert f"{site}/{module}" in deb.members, module
    assert not any(name.startswith(f"{site}/pymongo") for name in deb.members)
    assert not any("__pycache__" in name or name.endswith(".pyc") for name in deb.members)


def test_server_deb_ships_agent_and_server_but_no_harness(debs: Debs) -> None:
    deb = debs.server
    site = deb.site("provision-server")
    shipped = {
        name.removeprefix(site + "/"): body
        for name, body in deb.data.items()
        if name.startswith((f"{site}/agent/", f"{site}/server/"))
    }
    assert shipped == repo_python_files("agent", "server")
    for name in ("harness", "tests", "bench"):
        assert f"{site}/{name}" not in deb.members, name
    assert f"{site}/pymongo/__init__.py" in deb.members
    assert "mosquitto" in deb.field("Depends")
    if (ROOT / "server/broker/provisioning_guard.c").exists():
        # Prebuilt: the backend host needs no compiler (broker-config --guard-plugin).
        plugin = deb.members["/usr/lib/provision-server/provisioning_guard.so"]
        assert plugin.isfile() and plugin.size > 0


def test_units_and_system_user_files(debs: Debs) -> None:
    for deb, units in (
        (debs.agent, ("provision-agent.service", "provision-factory-console.service")),
        (debs.server, ("provision-server.service",)),
    ):
        for unit in units:
            shipped = deb.data[f"/lib/systemd/system/{unit}"]
            assert shipped == (ROOT / "systemd" / unit).read_bytes(), unit
    sysusers = debs.agent.data["/usr/lib/sysusers.d/provision-agent.conf"].decode()
    assert "u provision-agent " in sysusers
    tmpfiles = debs.agent.data["/usr/lib/tmpfiles.d/provision-agent.conf"].decode()
    assert "d /etc/provision-agent 0700 provision-agent provision-agent" in tmpfiles
    sysusers = debs.server.data["/usr/lib/sysusers.d/provision-server.conf"].decode()
    assert "u provision-server " in sysusers
    postinst = debs.agent.control["postinst"].decode()
    assert "systemd-sysusers provision-agent.conf" in postinst
    assert "install -d -o provision-agent -g provision-agent -m 0700 /etc/provision-agent" in (
        postinst
    )


def test_file_owners_and_modes(debs: Debs) -> None:
    for deb in (debs.agent, debs.server):
        for name, info in deb.members.items():
            assert (info.uname, info.gname, info.uid, info.gid) == ("root", "root", 0, 0), name
            mode = stat.S_IMODE(info.mode)
            if info.isdir():
                assert mode == 0o755, (name, oct(mode))
            elif info.issym():
                continue
            elif name.startswith("/usr/bin/"):
                assert mode == 0o755, (name, oct(mode))
            else:
                assert mode == 0o644, (name, oct(mode))
        for script in ("postinst", "prerm", "postrm"):
            assert script in deb.control, script
    assert debs.agent.members["/usr/lib/provision-agent/bin/python3"].linkname == (
        "../../../bin/python3"
    )


def test_server_default_config_loads_and_is_a_conffile(debs: Debs, tmp_path: Path) -> None:
    path = "/etc/provision-server/server.toml"
    assert debs.server.control["conffiles"].decode().split() == [path]
    config_file = tmp_path / "server.toml"
    config_file.write_bytes(debs.server.data[path])
    config = load_server_config(config_file, env={})
    assert config.ca_dir == Path("/var/lib/provision-server/ca")
    assert config.broker_config_dir == Path("/var/lib/provision-server/mosquitto")


needs_debian_python = pytest.mark.skipif(
    not os.path.exists("/usr/bin/python3.11"), reason="needs Debian 12's /usr/bin/python3.11"
)


def unpack(deb: Deb, into: Path) -> dict[str, str]:
    """The package's files under ``into``, /usr/bin/python3 pointing at Debian's 3.11."""
    subprocess.run(["dpkg-deb", "-x", deb.path, into], check=True)
    (into / "usr/bin/python3").symlink_to("/usr/bin/python3.11")
    return {"PATH": "/usr/bin:/bin", "HOME": str(into)}


def run_wrapper(into: Path, command: str, *args: str) -> subprocess.CompletedProcess[str]:
    """/usr/bin/<command> of the unpacked package, pointed at the unpacked prefix."""
    wrapper = (into / "usr/bin" / command).read_text()
    wrapper = wrapper.replace("/usr/lib/provision-", str(into / "usr/lib/provision-"))
    (into / command).write_text(wrapper)
    return subprocess.run(
        ["sh", str(into / command), *args], cwd=into, env={"PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def import_all(into: Path, package: str, *modules: str) -> subprocess.CompletedProcess[str]:
    """Import every module of ``modules`` (packages) with the package's private python."""
    probe = (
        "import importlib, pkgutil, sys\n"
        f"for name in {modules!r}:\n"
        "    root = importlib.import_module(name)\n"
        "    for info in pkgutil.walk_packages(root.__path__, name + '.'):\n"
        "        importlib.import_module(info.name)\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'server', 'harness', 'tests'}))"
    )
    python = into / "usr/lib" / package / "bin/python3"
    return subprocess.run(
        [str(python), "-P", "-c", probe], cwd=into, env={"PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@needs_debian_python
def test_agent_runs_from_its_private_environment_alone(debs: Debs, tmp_path: Path) -> None:
    """The bundle alone: the package's venv over Debian's python3, no repo, no server."""
    unpack(debs.agent, tmp_path)
    result = run_wrapper(tmp_path, "provision-agent", "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage: provision-agent" in result.stdout
    imported = import_all(tmp_path, "provision-agent", "agent")
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == "[]"  # nothing of server or harness came along


@needs_debian_python
def test_server_runs_from_its_private_environment_alone(debs: Debs, tmp_path: Path) -> None:
    """Every server module imports from the bundle (a dependency missing from
    packaging/requirements-server.txt fails here, not on the backend host)."""
    unpack(debs.server, tmp_path)
    for command in ("provision-server", "provision-station"):
        result = run_wrapper(tmp_path, command, "--help")
        assert result.returncode == 0, result.stderr
        assert f"Usage: {command}" in result.stdout
    imported = import_all(tmp_path, "provision-server", "agent", "server")
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == "['server']"


def test_pins_cover_the_declared_dependencies() -> None:
    """packaging/requirements-*.txt pin a version of each pyproject dependency that it allows."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    environment = {"python_version": "3.11", "python_full_version": "3.11.2"}

    def pins(name: str) -> dict[str, Version]:
        found: dict[str, Version] = {}
        for line in (ROOT / "packaging" / name).read_text().splitlines():
            line = line.split("#")[0].strip()
            if line.startswith("-r "):
                found.update(pins(line.split()[1]))
            elif line:
                requirement = Requirement(line)
                (spec,) = requirement.specifier
                assert spec.operator == "==", line
                found[canonicalize_name(requirement.name)] = Version(spec.version)
        return found

    for file, declared in (
        ("requirements-agent.txt", project["dependencies"]),
        (
            "requirements-server.txt",
            project["dependencies"] + project["optional-dependencies"]["server"],
        ),
    ):
        pinned = pins(file)
        for text in declared:
            requirement = Requirement(text)
            if requirement.marker and not requirement.marker.evaluate(environment):
                continue
            name = canonicalize_name(requirement.name)
            assert name in pinned, f"{file}: {name} is not pinned"
            assert pinned[name] in requirement.specifier, f"{file}: {name} {pinned[name]}"


def test_lintian_is_clean(debs: Debs) -> None:
    """Errors and warnings fail; each override is explained in packaging/deb/*/lintian-overrides."""
    lintian = shutil.which("lintian")
    assert lintian, "lintian is missing: scripts/build-debs.sh installs it"
    result = subprocess.run(
        [lintian, "--fail-on", "error,warning", str(debs.agent.path), str(debs.server.path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    for package in ("provision-agent", "provision-server"):
        overrides = (ROOT / "packaging/deb" / package / "lintian-overrides").read_text()
        # Blocks separated by blank lines: every block of overrides opens with its reason.
        for block in overrides.split("\n\n"):
            lines = block.strip().splitlines()
            if any(not line.startswith("#") for line in lines):
                assert lines[0].startswith("#"), f"{package}: override without a reason: {block}"


@pytest.mark.slow
def test_agent_package_installs_on_debian_12_with_user_directory_and_units(
    debs: Debs, tmp_path: Path
) -> None:
    """dpkg -i in a Debian 12 root file system (as an image build does), then purge."""
    from harness.deployed_backend import ensure_rootfs_tarball

    assert os.geteuid() == 0, "chroot needs root (CI runs as root)"
    root = tmp_path / "root"
    root.mkdir()
    tarball = ensure_rootfs_tarball(tmp_path / "mmdebstrap.log")
    subprocess.run(["tar", "-C", root, "-xf", tarball], check=True, timeout=300)
    shutil.copy(debs.agent.path, root / "tmp" / "agent.deb")

    def chroot(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["chroot", str(root), *argv], env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    installed = chroot("dpkg", "-i", "/tmp/agent.deb")
    assert installed.returncode == 0, installed.stdout + installed.stderr
    user = chroot("getent", "passwd", "provision-agent").stdout.split(":")
    assert user[0] == "provision-agent" and user[6].strip() == "/usr/sbin/nologin"
    config_dir = (root / "etc/provision-agent").stat()
    assert stat.S_IMODE(config_dir.st_mode) == 0o700
    assert config_dir.st_uid == int(user[2]) and config_dir.st_gid == int(user[3])
    wants = root / "etc/systemd/system/multi-user.target.wants"
    for unit in ("provision-agent.service", "provision-factory-console.service"):
        assert os.readlink(wants / unit) == f"/lib/systemd/system/{unit}"
    helped = chroot("provision-agent", "--help")  # Debian's python3 + the bundle, in place
    assert helped.returncode == 0 and "Usage: provision-agent" in helped.stdout, helped.stderr
    assert list((root / "usr/lib/provision-agent").rglob("*.pyc"))  # compiled at install
    purged = chroot("dpkg", "--purge", "provision-agent")
    assert purged.returncode == 0, purged.stdout + purged.stderr
    assert not (root / "usr/lib/provision-agent").exists()
    assert not (root / "etc/provision-agent").exists()
    assert not (wants / "provision-agent.service").exists()
