"""The ``provisioning_guard`` Mosquitto plugin: its C sources beside this module, and its build.

Mosquitto 2.0.11's ``acl_file`` grants every SUBSCRIBE, re-parses the whole file on every
reload and offers no way to cut a session from outside. The plugin (API v5) adds
subscribe-time authorization, the birth and operational certificates' ACLs, and a control
topic that changes one device's rights, reloads the broker and disconnects sessions
(docs/broker.md says why not the dynamic-security plugin): ``provisioning_guard.c`` holds
the checks and the plugin's life cycle, ``guard_control.c`` the control topic,
``device_rights.c`` the operational rights table. It is compiled with the system C compiler
against Debian's ``mosquitto-dev`` headers, so building needs ``gcc``, ``libc6-dev`` and
``mosquitto-dev``; running needs only the ``.so`` (``provision-server broker-config``
copies it beside the configuration: the one given with ``--guard-plugin``, else a packaged
one (``PACKAGED``), else it builds one).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Final

import platformdirs

from server.errors import ServerError

SOURCE: Final = Path(__file__).with_name("provisioning_guard.c")
"""The plugin's entry points (``mosquitto_plugin_init``); compiled with ``SOURCES``."""
SOURCES: Final = tuple(
    Path(__file__).with_name(name)
    for name in ("provisioning_guard.c", "guard_control.c", "device_rights.c")
)
HEADERS: Final = tuple(Path(__file__).with_name(name) for name in ("guard.h", "device_rights.h"))
PLUGIN_NAME: Final = "provisioning_guard.so"
PACKAGED: Final = (
    Path("/usr/lib/provision-server") / PLUGIN_NAME,
    Path(__file__).with_name(PLUGIN_NAME),
)
"""Where a package build puts the compiled plugin (the .deb: the first), so a host without a
compiler runs ``broker-config`` as is."""
BUILD_PACKAGES: Final = "gcc, libc6-dev and mosquitto-dev"
CFLAGS: Final = ("-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11", "-fPIC", "-shared")
BUILD_TIMEOUT_S: Final = 120.0


class PluginBuildError(ServerError):
    """The plugin cannot be compiled (no compiler or no Mosquitto headers)."""


def _compiler() -> str:
    for candidate in (os.environ.get("CC"), "cc", "gcc"):
        found = shutil.which(candidate) if candidate else None
        if found:
            return found
    raise PluginBuildError(f"no C compiler to build {SOURCE.name}: install {BUILD_PACKAGES}")


def build_guard_plugin(output: Path) -> Path:
    """Compile the plugin into ``output`` (replaced atomically); returns ``output``."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    argv = [_compiler(), *CFLAGS, "-o", str(temporary), *(str(path) for path in SOURCES)]
    try:
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False
        )
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()[:5]
            raise PluginBuildError(
                f"building {SOURCE.name} failed (needs {BUILD_PACKAGES}): " + " | ".join(detail)
            )
        os.chmod(temporary, 0o644)
        os.replace(temporary, output)
    finally:
        temporary.unlink(missing_ok=True)
    return output


def packaged_guard_plugin() -> Path | None:
    """The plugin a package installed (``PACKAGED``), if any."""
    return next((path for path in PACKAGED if path.is_file()), None)


def source_digest() -> str:
    """What the cached build is keyed by: every source and header, and the flags."""
    digest = hashlib.sha256(" ".join(CFLAGS).encode())
    for path in (*SOURCES, *HEADERS):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def cached_guard_plugin() -> Path:
    """The plugin built once per source version in the user's cache (tests, harness, bench)."""
    cache = Path(platformdirs.user_cache_dir("device-provisioning"))
    path = cache / f"provisioning_guard-{source_digest()}.so"
    if not path.exists():
        build_guard_plugin(path)
    return path
