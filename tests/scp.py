"""A real pynetdicom storage SCP for tests: results are sent to it over loopback."""

from __future__ import annotations

from collections.abc import Callable, Iterator
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
    observe: Callable[[Dataset], None] | None = None  # called before each answer

    def handle_store(self, event: Event) -> int:
        """Keep the dataset, let ``observe`` see it, and answer ``status``."""
        self.received.append(event.dataset)
        if self.observe is not None:
            self.observe(event.dataset)
        return int(self.status)


@contextmanager
def storage_scp(
    port: int,
    ae_title: str = "PACS",
    status: int = Status.SUCCESS,
    observe: Callable[[Dataset], None] | None = None,
) -> Iterator[FakePacs]:
    """Run a storage SCP on loopback ``port`` for the duration of the block; ``observe``
    sees each instance before it is acknowledged."""
    pacs = FakePacs(status=status, observe=observe)
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
