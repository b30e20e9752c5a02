"""A real pynetdicom storage SCP for tests: results are sent to it over loopback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.events import Event

from dicomnode.status import Status


@dataclass
class FakePacs:
    """What the SCP received, and the status it answers."""

    status: int = Status.SUCCESS
    received: list[Dataset] = field(default_factory=list)

    def handle_store(self, event: Event) -> int:
        """Keep the dataset and answer ``status``."""
        self.received.append(event.dataset)
        return int(self.status)


@contextmanager
def storage_scp(
    port: int, ae_title: str = "PACS", status: int = Status.SUCCESS
) -> Iterator[FakePacs]:
    """Run a storage SCP on loopback ``port`` for the duration of the block."""
    pacs = FakePacs(status=status)
    ae = AE(ae_title=ae_title)
    ae.supported_contexts = AllStoragePresentationContexts
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, pacs.handle_store)]
    )
    assert server is not None
    try:
        yield pacs
    finally:
        server.shutdown()
