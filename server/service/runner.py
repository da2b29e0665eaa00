"""Wires config, CA, database and broker into a running service; handles signals."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from datetime import timedelta
from types import FrameType

from server.config import ServerConfig
from server.pki.ca import CertificateAuthority
from server.service.metrics import CrlFile, ServerMetrics
from server.service.mqtt_transport import BrokerEndpoint, ProvisioningServer
from server.service.policy import ReprovisionPolicy, ServicePolicy
from server.service.provisioning import ProvisioningService
from server.store.db import Database
from server.store.status_writer import StatusBatcher


def configure_logging(verbose: bool) -> None:
    """One line per event on stderr (journald adds its own timestamp and unit)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    # paho and pymongo are chatty at DEBUG and never needed at INFO.
    logging.getLogger("pymongo").setLevel(logging.WARNING)


def policy_of(config: ServerConfig) -> ServicePolicy:
    return ServicePolicy(
        token_lifetime=timedelta(seconds=config.token_lifetime_s),
        token_min_interval=config.token_min_interval_s,
        certificate_validity=timedelta(days=config.certificate_validity_days),
        not_allocated_retry_after=config.not_allocated_retry_s,
        status_write_interval=config.status_write_interval_s,
        offline_timeout=timedelta(seconds=config.offline_timeout_s),
        reprovision=ReprovisionPolicy(config.reprovision),
        reprovision_offline_after=timedelta(seconds=config.reprovision_offline_after_s),
        reprovision_retry_after=config.reprovision_retry_s,
        renew_min_interval=config.renew_min_interval_s,
    )


def run_service(config: ServerConfig, *, verbose: bool = False) -> None:
    """Run until SIGTERM/SIGINT, then stop gracefully (drain, disconnect)."""
    configure_logging(verbose)
    log = logging.getLogger("provision.server")
    ca = CertificateAuthority.load(config.ca_dir, config.ca_passphrase())
    metrics = ServerMetrics()
    # Served first: a taken port fails the start before anything else is touched.
    endpoint = None
    if config.metrics_port is not None:
        endpoint = metrics.serve(config.metrics_port, config.metrics_host)
    database = Database(config.mongodb_uri, event_listeners=[metrics.command_listener()])
    database.init()
    # Requests in flight share database round trips (server/store/group_commit.py).
    database.start_group_commit(config.db_batches_in_flight)
    status_writer = StatusBatcher(database).start()
    service = ProvisioningService(
        database, ca, policy_of(config), status_writer=status_writer, metrics=metrics
    )
    server = ProvisioningServer(
        service,
        ca,
        BrokerEndpoint(config.broker_host, config.broker_port),
        workers=config.workers,
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    sync = None
    if config.broker_config_dir is not None:
        from server.broker.acl_sync import AclSync
        from server.broker.layout_file import load_layout

        layout = load_layout(config.broker_config_dir)
        sync = AclSync(database, ca, layout).start()
        metrics.state.sync = sync
        metrics.state.crls = {
            "device": CrlFile(layout.crl_path),
            "factory": CrlFile(layout.factory_crl_path),
        }
    metrics.state.transport, metrics.state.status_writer, metrics.state.ca = (
        server, status_writer, ca
    )  # fmt: skip
    metrics.state.database = database  # its group commit, once started, is read at scrape
    server.start()
    log.info(
        "event=started database=%s broker=%s:%d",
        database.safe_uri,
        config.broker_host,
        config.broker_port,
    )
    stop.wait()
    log.info("event=stopping")
    server.stop()
    status_writer.stop()
    if sync is not None:
        sync.stop()
    if endpoint is not None:
        endpoint.close()
    database.close()
