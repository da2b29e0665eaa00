"""docs/server.md "Deploy" is what scripts/deploy-backend.sh runs: it parses, its commands
exist, and its paths are the ones the package's server.toml and unit expect.

The block itself runs on a booted Debian 12 system (scripts/deploy-backend.sh, used by the
board VM); here only what can be checked without one.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

from click.testing import CliRunner

from server.cli.main import main as server_main
from server.config import load_server_config
from tests.test_systemd_units import SERVER, one, parse_unit

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "deploy-backend.sh"
SERVER_TOML = ROOT / "packaging" / "deb" / "provision-server" / "server.toml"


def deploy_block(**env: str) -> str:
    result = subprocess.run(
        ["bash", str(SCRIPT), "--print"],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return result.stdout


def commands(block: str) -> list[list[str]]:
    """The block's simple commands, continuation lines joined, comments dropped."""
    joined = block.replace("\\\n", " ")
    found = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            found.append(words)
    return found


def option(words: list[str], name: str) -> str:
    return words[words.index(name) + 1]


def test_the_block_is_valid_bash_and_starts_with_the_site_values() -> None:
    block = deploy_block()
    check = subprocess.run(["bash", "-n"], input=block, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    lines = block.splitlines()
    assert lines[0].startswith("MONGODB_URI=mongodb://")
    assert lines[1].startswith("BROKER_NAME=")
    site = deploy_block(MONGODB_URI="mongodb://10.0.2.2:27017/fleet x", BROKER_NAME="b.test")
    site_lines = site.splitlines()
    assert site_lines[0].startswith("MONGODB_URI=mongodb://10.0.2.2:27017/fleet\\ x ")
    assert site_lines[1].startswith("BROKER_NAME=b.test ")
    assert site_lines[2:] == lines[2:]  # only the site values change


def test_every_provision_server_command_exists_with_its_options() -> None:
    ran = []
    for words in commands(deploy_block()):
        if words[0] != "provision-server":
            continue
        # --help after the options: click still rejects an unknown command or option.
        result = CliRunner().invoke(server_main, [*words[1:], "--help"])
        assert result.exit_code == 0, f"{shlex.join(words)}: {result.output}"
        ran.append(words[1])
    assert ran == ["db", "ca", "broker-config"]


def test_paths_match_the_packaged_config_and_unit() -> None:
    config = load_server_config(SERVER_TOML, env={})
    unit = parse_unit(SERVER)
    found = {words[1] if words[0] == "provision-server" else words[0]: words
             for words in commands(deploy_block())}  # fmt: skip
    ca_init = found["ca"]
    broker = found["broker-config"]
    assert Path(option(ca_init, "--dir")) == config.ca_dir
    assert Path(option(broker, "--ca-dir")) == config.ca_dir
    assert Path(option(broker, "--out")) == config.broker_config_dir
    assert option(broker, "--run-as") == "mosquitto"
    credential = one(unit, "Service", "LoadCredential").split(":", 1)[1]
    assert option(ca_init, "--passphrase-file") == credential
    assert option(broker, "--passphrase-file") == credential
    block = deploy_block()
    assert f"/usr/sbin/mosquitto -c %s\\n' \\\n    {config.broker_config_dir}/mosquitto.conf" in (
        block
    )
    assert "apt-get install -y ./provision-server_*.deb" in block
    assert block.rstrip().endswith("systemctl enable --now provision-server.service")
    environment_file = one(unit, "Service", "EnvironmentFile").lstrip("-")
    assert f'echo "MONGODB_URI=$MONGODB_URI" > {environment_file}' in block


def test_a_doc_without_the_block_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "scripts").mkdir()
    (tmp_path / "docs").mkdir()
    copy = tmp_path / "scripts" / "deploy-backend.sh"
    copy.write_text(SCRIPT.read_text())
    (tmp_path / "docs" / "server.md").write_text("# Server\n\n## Deploy\n\nNothing here.\n")
    result = subprocess.run(
        ["bash", str(copy), "--print"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    assert "no ```sh block under '## Deploy'" in result.stderr
