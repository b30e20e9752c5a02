"""Storage SCP: accepts C-ECHO and C-STORE from allowed peers and spools what they send.

The C-STORE handler is thin: it reads only identifying and routing attributes (never
pixels), makes the bytes exactly as sent durable, then answers: in the ingest journal
(:mod:`dicomnode.journal`, the default), which moves them into the spool and the state
afterwards, or (``[node.journal] enabled = false``) in the spool and the state directly.
"""

from __future__ import annotations

import hashlib
import socket
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from pydicom import config as pydicom_config
from pydicom import uid
from pydicom.dataset import Dataset
from pynetdicom import AE, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom.association import Association as PynetAssociation
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.pdu_primitives import A_RELEASE

from dicomnode import phi, spool, validation
from dicomnode.completeness import instance_facts
from dicomnode.config import NodeConfig
from dicomnode.disk import is_disk_full_error
from dicomnode.door import (
    ABORT_PRIMITIVES,
    CALLED_AE_NOT_RECOGNISED,
    CALLING_AE_NOT_RECOGNISED,
    Door,
    GuardedAssociationServer,
    Rejection,
    start_guarded_server,
)
from dicomnode.group_commit import GroupCommit
from dicomnode.journal import Journal, classify
from dicomnode.records import Association, InstanceRecord, RecordOutcome
from dicomnode.series_facts import ReleaseTracker, SeriesFactsStore
from dicomnode.startup import listen_error
from dicomnode.state import InstanceConflict, StateStore
from dicomnode.status import Status
from dicomnode.tls import server_context
from dicomnode.validation import DECODE_ERRORS
from dicomnode.watermark import low_space_reason, lowest_free_bytes, space_rejection

log = structlog.get_logger(__name__)

VERIFICATION_SOP_CLASS = uid.UID("1.2.840.10008.1.1")  # PS3.4 Annex A
RELEASE_WAIT_S = 10.0  # a release is answered once its instances are recorded, or after this

STORAGE_CLASSES: tuple[str, ...] = (
    uid.CTImageStorage,
    uid.EnhancedCTImageStorage,
    uid.LegacyConvertedEnhancedCTImageStorage,
    uid.MRImageStorage,
    uid.EnhancedMRImageStorage,
    uid.LegacyConvertedEnhancedMRImageStorage,
    uid.SecondaryCaptureImageStorage,
    uid.MultiFrameSingleBitSecondaryCaptureImageStorage,
    uid.MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    uid.MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    uid.MultiFrameTrueColorSecondaryCaptureImageStorage,
)

TRANSFER_SYNTAXES: tuple[str, ...] = (
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
    *uid.JPEGTransferSyntaxes,
    *uid.JPEGLSTransferSyntaxes,
    *uid.JPEG2000TransferSyntaxes,
    *uid.RLETransferSyntaxes,
)


class StoreRefused(Exception):
    """A C-STORE that is answered with a failure ``status``."""

    def __init__(self, status: Status, reason: str) -> None:
        """Keep the status to answer and the reason to log."""
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True)
class _Identity:
    """The attributes of a received dataset that identify and route it."""

    study: str
    series: str
    sop: str
    sop_class: str
    modality: str
    body_part: str
    description: str
    protocol: str
    image_type: tuple[str, ...]


def _text(ds: Dataset, keyword: str) -> str:
    """An attribute as a stripped string, ``""`` when absent."""
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def identify(ds: Dataset, context_sop_class: str) -> _Identity:
    """Read the identifying attributes; raise :class:`StoreRefused` if they are unusable."""
    try:
        ident = _Identity(
            study=_text(ds, "StudyInstanceUID"),
            series=_text(ds, "SeriesInstanceUID"),
            sop=_text(ds, "SOPInstanceUID"),
            sop_class=_text(ds, "SOPClassUID"),
            modality=_text(ds, "Modality"),
            body_part=_text(ds, "BodyPartExamined"),
            description=_text(ds, "SeriesDescription"),
            protocol=_text(ds, "ProtocolName"),
            image_type=tuple(str(v).strip() for v in (ds.get("ImageType") or ())),
        )
    except DECODE_ERRORS as exc:
        raise StoreRefused(
            Status.CANNOT_UNDERSTAND_UNDECODABLE, f"cannot decode ({type(exc).__name__})"
        ) from exc
    for name in ("study", "series", "sop"):
        if not spool.is_valid_uid(getattr(ident, name)):
            raise StoreRefused(
                Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, f"missing or malformed {name} UID"
            )
    if ident.sop_class != context_sop_class:
        raise StoreRefused(
            Status.SOP_CLASS_DIFFERS_FROM_CONTEXT, "SOP Class UID differs from the context's"
        )
    return ident


def _requested_title(assoc: PynetAssociation, which: str) -> str:
    """The calling or called AE title of the peer's A-ASSOCIATE request."""
    primitive = assoc.requestor.primitive
    if primitive is None:
        return ""
    title = primitive.calling_ae_title if which == "calling" else primitive.called_ae_title
    return title.strip()


class Receiver:
    """The node's listening Application Entity."""

    def __init__(
        self, config: NodeConfig, store: StateStore, on_stored: Callable[[], None] | None = None
    ) -> None:
        """Receive per ``config`` into ``store``; call ``on_stored`` after each instance."""
        self.config = config
        self.store = store
        self.on_stored = on_stored
        self.door = Door(config.node.connections)
        self.releases = ReleaseTracker()  # which open association sent which series
        self.facts = SeriesFactsStore(store)
        self.commits = GroupCommit(store)
        self.journal = Journal(config.state_dir / "journal", config.spool_dir, store,
                               config.node.journal)  # fmt: skip
        self._journaling = config.node.journal.enabled
        self._server: GuardedAssociationServer | None = None

    def build_ae(self) -> AE:
        """An AE supporting Verification and the storage classes with every syntax."""
        ae = AE(ae_title=self.config.node.ae_title)
        ae.maximum_pdu_size = self.config.node.max_pdu
        ae.add_supported_context(VERIFICATION_SOP_CLASS)
        for abstract in STORAGE_CLASSES:
            ae.add_supported_context(abstract, list(TRANSFER_SYNTAXES))
        return ae

    def start(self) -> None:
        """Replay what a previous run left in the journal, then listen on the configured
        address in background threads."""
        # pydicom checks each value it reads (every UID pynetdicom makes of a PDU, a
        # command or a context) only to warn: CPU on every instance (bench/README.md,
        # third ingest pass). The node decides from its own checks (identify,
        # validation); the warnings quoted the values. Process-wide setting.
        pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
        self.journal.recover()
        if self._journaling:
            self.journal.start()
            self.store.unrecorded = self.journal.has_pending
        handlers: list[EventHandlerType] = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ACSE_RECV, self._on_acse_recv),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
        ]
        address = (self.config.node.host, self.config.node.port)
        tls = self.config.node.tls
        context = None if tls is None else server_context(tls)
        try:
            self._server = start_guarded_server(
                self.build_ae(), address, handlers, self.door, context
            )
        except OSError as exc:
            raise listen_error("DICOM", address[0], address[1], exc) from None
        log.info("receiver listening", host=address[0], port=address[1], tls=tls is not None)

    def stop(self) -> None:
        """Stop listening and close open associations."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.journal.close()

    @staticmethod
    def _on_conn_open(event: Event) -> None:
        """Turn Nagle's algorithm off: DCMTK peers otherwise wait ~45 ms per instance."""
        sock = event.assoc.dul.socket
        if sock is not None and sock.socket is not None:
            sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _title_rejection(self, calling: str, called: str, host: str) -> Rejection | None:
        """Why the node refuses these AE titles from ``host``, or ``None`` if allowed."""
        if called != self.config.node.ae_title:
            return CALLED_AE_NOT_RECOGNISED
        for caller in self.config.allowed_callers:
            if caller.ae_title == calling and caller.host in (None, host):
                return None
        return CALLING_AE_NOT_RECOGNISED

    def _free_bytes(self) -> int:
        """Least free space on the spool and state file systems."""
        return lowest_free_bytes((self.config.spool_dir, self.config.state_dir))

    def _space_rejection(self) -> Rejection | None:
        """The rejection of a new association while free space is below the watermark."""
        return space_rejection(self._free_bytes(), self.config.limits.min_free_bytes)

    def _on_requested(self, event: Event) -> None:
        """Reject requests to another AE title, from callers not allowed, or over a cap."""
        assoc = event.assoc
        calling = _requested_title(assoc, "calling")
        called = _requested_title(assoc, "called")
        host = assoc.requestor.address
        rejection = self.door.request(
            assoc, self._title_rejection(calling, called, host) or self._space_rejection()
        )
        if rejection is None:
            return
        log.warning(
            "association rejected", reason=rejection.reason, calling_aet=calling,
            called_aet=called, peer_host=host, peer_port=assoc.requestor.port,
            result=rejection.result.name.lower(),
        )  # fmt: skip
        assoc.acse.send_reject(rejection.result, rejection.source, rejection.diagnostic)
        assoc.kill()  # as pynetdicom does: waits until the A-ASSOCIATE-RJ has gone out

    @staticmethod
    def _on_rejected(event: Event) -> None:
        """Log a rejection pynetdicom decided itself (its own backstop limits)."""
        assoc = event.assoc
        log.warning(
            "association rejected", reason="rejected by the DICOM stack (pynetdicom)",
            calling_aet=_requested_title(assoc, "calling"),
            peer_host=assoc.requestor.address, peer_port=assoc.requestor.port,
        )  # fmt: skip

    def _on_acse_recv(self, event: Event) -> None:
        """Keep the reason of an incoming A-ABORT / A-P-ABORT for the abort's log line;
        hold a release request until the journal recorded what was acknowledged."""
        primitive = getattr(event, "primitive", None)  # set by pynetdicom for this event
        if isinstance(primitive, ABORT_PRIMITIVES):
            self.door.note_abort(event.assoc, primitive)
        elif (
            isinstance(primitive, A_RELEASE)
            and primitive.result is None  # the peer's request
            and self._journaling
            and not self.journal.wait_moved(RELEASE_WAIT_S)
        ):
            log.warning(
                "release answered before its instances were recorded",
                pending=self.journal.pending(),
            )

    def _on_aborted(self, event: Event) -> None:
        """Log an association aborted by either side or by the network layer."""
        assoc = event.assoc
        log.warning(
            "association aborted", reason=self.door.abort_reason(assoc),
            calling_aet=_requested_title(assoc, "calling"),
            peer_host=assoc.requestor.address, peer_port=assoc.requestor.port,
        )  # fmt: skip

    def _on_released(self, event: Event) -> None:
        """Record the release of an association as completeness evidence for the series
        it sent that no other open association holds."""
        series = self.releases.released(event.assoc)
        try:
            self.facts.mark_released(series, time.time())
        except sqlite3.Error as exc:  # only evidence is lost: the stable age still applies
            log.warning("association release not recorded", series=len(series), error=str(exc))

    def _on_conn_close(self, event: Event) -> None:
        """Forget a closed association's series (already done when it was released)."""
        self.releases.aborted(event.assoc)

    def _on_store(self, event: Event) -> Dataset:
        """Spool and record one instance, answering a specific status on failure.

        A refusal's reason also goes back to the peer as the response's Error Comment.
        """
        assoc = event.assoc
        who = Association(
            calling_aet=assoc.requestor.ae_title.strip(),
            called_aet=_requested_title(assoc, "called"),
        )
        try:
            self._store(event, who)
        except StoreRefused as exc:
            log.warning(
                "store refused", status=f"0x{exc.status:04X}", reason=str(exc),
                calling_aet=who.calling_aet,
            )  # fmt: skip
            return _response(exc.status, str(exc))
        if self.on_stored is not None:
            self.on_stored()
        return _response(Status.SUCCESS, "")

    def _store(self, event: Event, who: Association) -> None:
        """Check, identify, spool and record; raise :class:`StoreRefused` on any failure.

        Nothing is acknowledged before it is durable: flushed in the journal, or (without
        it) the file and its folder fsynced and the record committed. Instances that other
        associations store at the same time share those flushes. A SOP Instance UID stored
        in another series or study is refused and left where it is; re-sent with identical
        bytes it is a no-op.
        """
        context = event.context
        syntax = uid.UID(context.transfer_syntax or "")
        limits = self.config.limits
        sent = event.encoded_dataset(include_meta=False)
        if syntax.is_deflated:
            _raise_for(validation.check_inflated_size(sent, limits.max_inflated_bytes))
        try:
            ds = event.dataset
        except DECODE_ERRORS as exc:
            phi.remember_encoded(event.encoded_dataset(), context.transfer_syntax or "")
            raise StoreRefused(
                Status.CANNOT_UNDERSTAND_UNDECODABLE, f"cannot decode ({type(exc).__name__})"
            ) from exc
        phi.remember_identifiers(ds)  # before anything can log one of its values
        ident = identify(ds, context.abstract_syntax or "")
        _raise_for(validation.check_instance(ds, syntax, ident.sop_class, limits.max_decoded_bytes))
        digest = hashlib.sha256(sent).hexdigest()
        if not self._journaling and self._is_unchanged(ident, digest):
            return
        bound = log.bind(study_uid=ident.study, series_uid=ident.series)
        meta = spool.FILE_PREAMBLE + _file_meta(event)
        rec = InstanceRecord(
            sop_instance_uid=ident.sop, series_instance_uid=ident.series,
            study_instance_uid=ident.study, sop_class_uid=ident.sop_class,
            transfer_syntax_uid=context.transfer_syntax or "",
            path=spool.instance_path(self.config.spool_dir, ident.study, ident.series, ident.sop),
            received_at=time.time(), association=who, modality=ident.modality,
            body_part_examined=ident.body_part,
            series_description=ident.description, protocol_name=ident.protocol,
            image_type=ident.image_type, sha256=digest,
            facts=instance_facts(ds, ident.sop, ident.sop_class),
        )  # fmt: skip
        try:
            if self._journaling:  # decides unchanged/conflict itself, atomically
                outcome = self.journal.append(rec, meta, sent, self._check_space)
            else:
                self._check_space()
                outcome = self._spool_and_record(rec, meta, sent)
        except InstanceConflict as exc:
            raise _duplicate() from exc
        except OSError as exc:
            full = is_disk_full_error(exc)
            bound.error("cannot spool instance", error=exc.strerror, disk_full=full)
            status = Status.OUT_OF_RESOURCES if full else Status.PROCESSING_FAILURE
            raise StoreRefused(status, f"cannot spool: {exc.strerror}") from exc
        except sqlite3.Error as exc:
            full = is_disk_full_error(exc)
            bound.error("cannot record instance", error=str(exc), disk_full=full)
            status = Status.OUT_OF_RESOURCES if full else Status.PROCESSING_FAILURE
            raise StoreRefused(status, f"cannot record: {exc}") from exc
        if outcome is RecordOutcome.UNCHANGED:
            _log_unchanged(ident)
            return
        self.releases.stored(event.assoc, ident.series)
        if outcome is RecordOutcome.REPLACED:
            bound.info("instance replaced by different content", sop_uid=ident.sop)

    def _check_space(self) -> None:
        """Refuse an instance to store while free space is below the watermark."""
        low = low_space_reason(self._free_bytes(), self.config.limits.min_free_bytes)
        if low is not None:
            raise StoreRefused(Status.OUT_OF_RESOURCES, low)

    def _spool_and_record(self, rec: InstanceRecord, meta: bytes, sent: bytes) -> RecordOutcome:
        """Without the journal: write and fsync the file, then fsync its folder and record
        it with what other associations store meanwhile (:mod:`dicomnode.group_commit`)."""
        spool.write_atomic(rec.path, (meta, sent), sync_folder=False)
        try:
            return self.commits.record(rec)
        except InstanceConflict as exc:
            if exc.existing.path != rec.path:
                rec.path.unlink(missing_ok=True)
            raise

    def _is_unchanged(self, ident: _Identity, digest: str) -> bool:
        """Whether the UID is stored with these bytes already; refuse it if it is stored
        in another series or study."""
        existing = self.store.stored_instance(ident.sop)
        if existing is None:
            return False
        try:
            outcome = classify(existing, ident.series, ident.study, digest)
        except InstanceConflict as exc:
            raise _duplicate() from exc
        if outcome is not RecordOutcome.UNCHANGED:
            return False
        _log_unchanged(ident)
        return True


def _log_unchanged(ident: _Identity) -> None:
    """Log an instance re-sent with the bytes already stored."""
    log.info(
        "identical instance re-sent, nothing written", study_uid=ident.study,
        series_uid=ident.series, sop_uid=ident.sop,
    )  # fmt: skip


def _file_meta(event: Event) -> bytes:
    """The encoded File Meta Information for a C-STORE's dataset, as pynetdicom writes it
    (``event.file_meta``), encoded directly when the request's UIDs are valid."""
    request = event.request
    if isinstance(request, C_STORE):
        try:
            return spool.file_meta(
                str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID),
                str(event.context.transfer_syntax), PYNETDICOM_IMPLEMENTATION_UID,
                PYNETDICOM_IMPLEMENTATION_VERSION,
            )  # fmt: skip
        except ValueError:
            pass
    return encode_file_meta(event.file_meta)


def _duplicate() -> StoreRefused:
    """The refusal for a SOP Instance UID that belongs to another series or study."""
    return StoreRefused(
        Status.DUPLICATE_SOP_INSTANCE,
        "SOP Instance UID already stored in another series or study; kept there",
    )


def _raise_for(refusal: validation.Refusal | None) -> None:
    """Raise a check's refusal as :class:`StoreRefused`."""
    if refusal is not None:
        raise StoreRefused(refusal.status, refusal.reason)


ERROR_COMMENT_MAX = 64  # LO


def _response(status: Status, reason: str) -> Dataset:
    """A C-STORE response status dataset, with the reason as Error Comment on failure."""
    response = Dataset()
    response.Status = int(status)
    if reason:
        response.ErrorComment = reason.replace("\\", "/")[:ERROR_COMMENT_MAX]
    return response
