"""ES8+ — the Bound Profile Package (SGP.22 §2.5.5, docs/protocol.md §1.6 and §4), I/O free.

Three users:

* the LPA: ``bpp.split_bpp`` (re-exported here) cuts a BPP into its ES10
  LoadBoundProfilePackage commands; it lives in bpp.py, free of cryptography;
* the SM-DP+: ``bind_bpp`` binds ConfigureISDP, StoreMetadata and the UPP to one
  download session (ECKA with the eUICC's one-time key, X9.63 KDF, BSP);
* the eUICC: ``BppReceiver`` checks ``smdpSign``, derives the same keys and opens
  each 87/88/86 as it arrives, raising ``BppError`` with the bppCommandId and
  errorReason for the ProfileInstallationResult.

BPP layout: ``BF36{ BF23 InitialiseSecureChannel, A0{87 ConfigureISDP},
A1{88 StoreMetadata…}, [A2{87 ReplaceSessionKeys}], A3{86 profile data…} }``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from . import crypto, tlv
from .bpp import (BPP_COMMAND_NAMES, CMD_CONFIGURE_ISDP, CMD_INITIALISE_SECURE_CHANNEL,  # noqa: F401 (re-exported)
                  CMD_LOAD_PROFILE_ELEMENTS, CMD_REPLACE_SESSION_KEYS, CMD_STORE_METADATA, CMD_STORE_METADATA2,
                  ERR_ICCID_ALREADY_EXISTS, ERR_ICCID_MISMATCH, ERR_INCORRECT_INPUT_VALUES, ERR_INSUFFICIENT_MEMORY,
                  ERR_INTERRUPTION, ERR_INVALID_SIGNATURE, ERR_INVALID_TRANSACTION_ID, ERR_PE_PROCESSING,
                  ERR_PPR_NOT_ALLOWED, ERR_SCP03T_SECURITY, ERR_SCP03T_STRUCTURE, ERR_TEST_PROFILE_INVALID_NAA_KEY,
                  ERR_UNKNOWN, ERR_UNSUPPORTED_CRT_VALUES, ERR_UNSUPPORTED_PROFILE_CLASS,
                  ERR_UNSUPPORTED_REMOTE_OPERATION_TYPE, ERROR_REASON_NAMES, TAG_BPP, TAG_CONFIGURE_ISDP, TAG_ISC,
                  TAG_OTPK, TAG_REPLACE_SESSION_KEYS, TAG_SIG, TAG_STORE_METADATA, split_bpp)
from .bsp import MAX_SEGMENT, BspError, BspSession
from .errors import CardError, ProtocolError, code_for

REMOTE_OP_INSTALL_BPP = 1   # RemoteOpId installBoundProfilePackage
KEY_TYPE_AES = 0x88
KEY_LEN_128 = 0x10

class BppError(CardError):
    """LoadBoundProfilePackage failed: becomes ``finalResult = errorResult{bppCommandId, errorReason}``."""

    code = "bpp_error"

    def __init__(self, bpp_command_id: int, error_reason: int, message: str, *, code: str | None = None):
        cmd = BPP_COMMAND_NAMES.get(bpp_command_id, str(bpp_command_id))
        reason = ERROR_REASON_NAMES.get(error_reason, str(error_reason))
        code = code or "bpp_" + code_for(ERROR_REASON_NAMES.get(error_reason, "unknownError"))
        super().__init__(f"{cmd}: {reason}: {message}", code=code,
                         details={"bppCommandId": bpp_command_id, "errorReason": error_reason})
        self.bpp_command_id = bpp_command_id
        self.error_reason = error_reason


class BppSequenceError(BppError):
    """A command arrived out of order or after the session failed.  The simulated
    eUICC may prefer an ISO status word (6985) to a ProfileInstallationResult."""

    code = "bpp_sequence"

    def __init__(self, bpp_command_id: int, message: str):
        super().__init__(bpp_command_id, ERR_SCP03T_STRUCTURE, message, code="bpp_sequence")


# --- SM-DP+ side: bind -------------------------------------------------------------

def _otpk_tlv(point: bytes) -> bytes:
    return tlv.encode(TAG_OTPK, point)


def smdp_sign_data(isc_fields: bytes, euicc_otpk: bytes) -> bytes:
    """Data signed by SK.DPpb in BF23: the 82, 80, A6 and 5F49(otPK.DP) TLVs exactly as
    encoded, then a 5F49 TLV carrying otPK.EUICC (docs/protocol.md §4.3)."""
    return bytes(isc_fields) + _otpk_tlv(euicc_otpk)


def replace_session_keys_request(ppk_enc: bytes, ppk_mac: bytes, initial_mcv: bytes) -> bytes:
    """BF26{80 initialMCV, 81 ppkEnc, 82 ppkCmac} (automatic tags, docs/protocol.md §0.2, §4.7)."""
    return tlv.encode(TAG_REPLACE_SESSION_KEYS,
                      tlv.encode(0x80, initial_mcv) + tlv.encode(0x81, ppk_enc) + tlv.encode(0x82, ppk_mac))


def bind_bpp(*, transaction_id: bytes, euicc_otpk: bytes, dppb_key, eid: bytes, host_id: bytes,
             configure_isdp: bytes, store_metadata: bytes, upp: bytes, ppk=None,
             segment_size: int = MAX_SEGMENT, otsk_dp=None) -> tuple[bytes, object]:
    """Build a BoundProfilePackage; returns (BF36 bytes, otSK.DP.ECKA).

    ``ppk``: None (profile elements under the session keys), True (random
    PPK-ENC/PPK-MAC/initialMCV sent in A2 ReplaceSessionKeys), or a tuple
    (ppk_enc, ppk_mac, initial_mcv).  ``otsk_dp`` lets a retry reuse a key pair."""
    transaction_id, eid, host_id = bytes(transaction_id), bytes(eid), bytes(host_id)
    if not 1 <= len(transaction_id) <= 16:
        raise ValueError(f"transactionId must be 1..16 bytes, got {len(transaction_id)}")
    if len(eid) != 16:
        raise ValueError(f"EID must be 16 bytes, got {len(eid)}")
    for name, blob, want in (("configure_isdp", configure_isdp, TAG_CONFIGURE_ISDP),
                             ("store_metadata", store_metadata, TAG_STORE_METADATA)):
        if tlv.parse_single(bytes(blob)).tag != want:
            raise ValueError(f"{name} must be one {want:X} TLV")
    if otsk_dp is None:
        otsk_dp = crypto.generate_key(dppb_key.curve)
    otpk_dp = crypto.public_point(otsk_dp)
    fields = (tlv.encode(0x82, bytes([REMOTE_OP_INSTALL_BPP]))
              + tlv.encode(0x80, transaction_id)
              + tlv.encode(0xA6, tlv.encode(0x80, bytes([KEY_TYPE_AES])) + tlv.encode(0x81, bytes([KEY_LEN_128]))
                           + tlv.encode(0x84, host_id))
              + _otpk_tlv(otpk_dp))
    sig = crypto.sign_raw(dppb_key, smdp_sign_data(fields, euicc_otpk))
    isc = tlv.encode(TAG_ISC, fields + tlv.encode(TAG_SIG, sig))

    shs = crypto.ecka(otsk_dp, euicc_otpk)
    keys = crypto.derive_bsp_keys(shs, key_type=KEY_TYPE_AES, key_len=KEY_LEN_128, host_id=host_id, eid=eid)
    bsp = BspSession.from_keys(keys)

    a0 = b"".join(bsp.wrap_segments(0x87, configure_isdp, segment_size=segment_size))
    a1 = b"".join(bsp.wrap_segments(0x88, store_metadata, encrypt=False, segment_size=segment_size))
    body = isc + tlv.encode(0xA0, a0) + tlv.encode(0xA1, a1)
    if ppk is not None:
        if ppk is True:
            ppk = (os.urandom(16), os.urandom(16), os.urandom(16))
        ppk_enc, ppk_mac, mcv = (bytes(x) for x in ppk)
        a2 = bsp.wrap(0x87, replace_session_keys_request(ppk_enc, ppk_mac, mcv))
        body += tlv.encode(0xA2, a2)
        bsp.replace_keys(ppk_enc, ppk_mac, mcv)
    a3 = b"".join(bsp.wrap_segments(0x86, upp, segment_size=segment_size))
    body += tlv.encode(0xA3, a3)
    return tlv.encode(TAG_BPP, body), otsk_dp


# --- eUICC side: open -----------------------------------------------------------

@dataclass(frozen=True)
class InitialiseSecureChannel:
    """InitialiseSecureChannelRequest's fields (the BPP's first segment, BF23)."""
    transaction_id: bytes
    host_id: bytes
    otpk_dp: bytes


@dataclass(frozen=True)
class BppEvent:
    """What one ES10 command yielded.  kind is a BppCommandId name; data the plaintext
    (the full BF25 for storeMetadata, one chunk of the UPP for loadProfileElements)."""
    kind: str
    data: bytes | None = None


_CONTAINER_CMD = {None: CMD_INITIALISE_SECURE_CHANNEL, 0xA0: CMD_CONFIGURE_ISDP, 0xA1: CMD_STORE_METADATA,
                  0xA2: CMD_REPLACE_SESSION_KEYS, 0xA3: CMD_LOAD_PROFILE_ELEMENTS}


class BppReceiver:
    """eUICC-side LoadBoundProfilePackage state, driven one command at a time.

    Either call the per-kind methods (``initialise``, ``configure_isdp``,
    ``store_metadata``, ``replace_session_keys``, ``profile_segment``) with the
    bare TLVs, or hand each ES10 command as received to ``feed``, which also
    tracks the BF36/A0..A3 headers and knows when the package is ``complete``.
    After any BppError the receiver refuses further input."""

    def __init__(self, *, euicc_otsk, dppb_public_key, eid: bytes, expected_transaction_id: bytes):
        self._otsk = euicc_otsk
        self._dppb = crypto.as_public_key(dppb_public_key)
        self._eid = bytes(eid)
        self._txid = bytes(expected_transaction_id)
        self._bsp: BspSession | None = None
        self.state = "new"   # new → isdp → metadata → [ppk] → profile; or failed
        self.error: BppError | None = None
        self.isc: InitialiseSecureChannel | None = None
        self.configure_isdp_request: bytes | None = None
        self.store_metadata_request: bytes | None = None
        self.ppk_used = False
        self._metadata = bytearray()
        self._metadata_segments = 0
        self.upp = bytearray()
        # feed() bookkeeping: bytes left in BF36 and in the open A0..A3 container
        self._bf36_left: int | None = None
        self._container: int | None = None
        self._container_left = 0
        self._seen: list[int] = []

    # -- helpers ---------------------------------------------------------------
    def _fail(self, err: BppError) -> BppError:
        self.state = "failed"
        self.error = err
        return err

    def _require(self, cmd: int, *states: str) -> None:
        if self.state == "failed":
            raise BppSequenceError(cmd, f"the BPP session already failed ({self.error.message if self.error else ''})")
        if self.state not in states:
            raise self._fail(BppSequenceError(cmd, f"{BPP_COMMAND_NAMES[cmd]} not expected in state {self.state}"))

    def _unwrap(self, cmd: int, data: bytes, tag: int, encrypted: bool) -> bytes:
        try:
            return self._bsp.unwrap(data, encrypted=encrypted, expected_tag=tag)
        except BspError as e:
            raise self._fail(BppError(cmd, e.error_reason, e.message)) from None

    # -- per-command API ----------------------------------------------------------
    def initialise(self, bf23: bytes) -> InitialiseSecureChannel:
        """Check BF23 (signature, txId, CRT) and derive the session keys."""
        cmd = CMD_INITIALISE_SECURE_CHANNEL
        self._require(cmd, "new")

        def bad(reason: int, msg: str) -> BppError:
            return self._fail(BppError(cmd, reason, msg))

        try:
            t = tlv.parse_single(bytes(bf23))
            if t.tag != TAG_ISC:
                raise ProtocolError(f"tag {t.tag:X} is not BF23")
            fields = tlv.children(t)
        except ProtocolError as e:
            raise bad(ERR_INCORRECT_INPUT_VALUES, f"InitialiseSecureChannel is malformed: {e}") from None
        byt = {f.tag: f for f in fields}
        if [f.tag for f in fields] != [0x82, 0x80, 0xA6, TAG_OTPK, TAG_SIG]:
            raise bad(ERR_INCORRECT_INPUT_VALUES, "InitialiseSecureChannel must hold 82, 80, A6, 5F49, 5F37; found "
                      + ", ".join(f"{f.tag:X}" for f in fields))
        signed = b"".join(f.raw for f in fields[:4])
        if not crypto.verify_raw(self._dppb, smdp_sign_data(signed, crypto.public_point(self._otsk)),
                                 byt[TAG_SIG].value):
            raise bad(ERR_INVALID_SIGNATURE, "smdpSign does not verify with PK.DPpb")
        if byt[0x80].value != self._txid:
            raise bad(ERR_INVALID_TRANSACTION_ID, f"transactionId {byt[0x80].value.hex()} is not the "
                      f"session's {self._txid.hex()}")
        if byt[0x82].value != bytes([REMOTE_OP_INSTALL_BPP]):
            raise bad(ERR_UNSUPPORTED_REMOTE_OPERATION_TYPE, f"remoteOpId {byt[0x82].value.hex()} is not "
                      "installBoundProfilePackage(1)")
        try:
            crt = {c.tag: c.value for c in tlv.children(byt[0xA6])}
        except ProtocolError as e:
            raise bad(ERR_INCORRECT_INPUT_VALUES, f"control reference template is malformed: {e}") from None
        if crt.get(0x80) != bytes([KEY_TYPE_AES]) or crt.get(0x81) != bytes([KEY_LEN_128]) or 0x84 not in crt:
            raise bad(ERR_UNSUPPORTED_CRT_VALUES, "control reference template must be keyType 88 (AES), "
                      "keyLen 10 and carry a hostId")
        otpk_dp = byt[TAG_OTPK].value
        try:
            shs = crypto.ecka(self._otsk, otpk_dp)
        except crypto.CryptoError as e:
            raise bad(ERR_INCORRECT_INPUT_VALUES, f"otPK.DP.ECKA unusable: {e.message}") from None
        keys = crypto.derive_bsp_keys(shs, key_type=KEY_TYPE_AES, key_len=KEY_LEN_128,
                                      host_id=crt[0x84], eid=self._eid)
        self._bsp = BspSession.from_keys(keys)
        self.isc = InitialiseSecureChannel(byt[0x80].value, crt[0x84], otpk_dp)
        self.state = "isdp"
        return self.isc

    def configure_isdp(self, tlv87: bytes) -> bytes:
        """Open the A0 87; returns the ConfigureISDPRequest (BF24…)."""
        cmd = CMD_CONFIGURE_ISDP
        self._require(cmd, "isdp")
        pt = self._unwrap(cmd, tlv87, 0x87, True)
        if self.configure_isdp_request is None:
            try:
                if tlv.parse_single(pt).tag != TAG_CONFIGURE_ISDP:
                    raise ProtocolError("not a BF24 TLV")
            except ProtocolError as e:
                raise self._fail(BppError(cmd, ERR_INCORRECT_INPUT_VALUES,
                                          f"ConfigureISDP content is not one BF24 TLV: {e}")) from None
            self.configure_isdp_request = pt
        return pt

    def store_metadata(self, tlv88: bytes) -> bytes | None:
        """Check one 88 (MAC only).  Returns the complete StoreMetadataRequest (BF25…)
        once the segments received so far form it, else None."""
        cmd = CMD_STORE_METADATA if self._metadata_segments == 0 else CMD_STORE_METADATA2
        if self.state == "isdp" and self.configure_isdp_request is not None:
            self.state = "metadata"
        self._require(cmd, "metadata")
        if self.store_metadata_request is not None:
            raise self._fail(BppError(cmd, ERR_INCORRECT_INPUT_VALUES, "StoreMetadata already complete"))
        pt = self._unwrap(cmd, tlv88, 0x88, False)
        self._metadata_segments += 1
        self._metadata += pt
        try:
            tag, length, voff = tlv.read_header(bytes(self._metadata))
        except ProtocolError:
            return None  # header itself still incomplete
        if tag != TAG_STORE_METADATA:
            raise self._fail(BppError(cmd, ERR_INCORRECT_INPUT_VALUES,
                                      f"StoreMetadata starts with tag {tag:X}, expected BF25"))
        if len(self._metadata) < voff + length:
            return None
        if len(self._metadata) > voff + length:
            raise self._fail(BppError(cmd, ERR_INCORRECT_INPUT_VALUES, "data after the BF25 TLV"))
        self.store_metadata_request = bytes(self._metadata)
        return self.store_metadata_request

    def _metadata_done(self, cmd: int) -> None:
        if self.state == "metadata" and self.store_metadata_request is None:
            raise self._fail(BppError(CMD_STORE_METADATA, ERR_INCORRECT_INPUT_VALUES,
                                      "StoreMetadata incomplete when the next part arrived"))

    def replace_session_keys(self, tlv87: bytes) -> bytes:
        """Open the A2 87 and switch to the PPK keys (MCV = initialMCV, counter = 1)."""
        cmd = CMD_REPLACE_SESSION_KEYS
        self._require(cmd, "metadata")
        self._metadata_done(cmd)
        pt = self._unwrap(cmd, tlv87, 0x87, True)
        try:
            t = tlv.parse_single(pt)
            if t.tag != TAG_REPLACE_SESSION_KEYS:
                raise ProtocolError(f"tag {t.tag:X} is not BF26")
            f = {c.tag: c.value for c in tlv.children(t)}
            self._bsp.replace_keys(f[0x81], f[0x82], f[0x80])
        except (ProtocolError, KeyError, ValueError) as e:
            raise self._fail(BppError(cmd, ERR_INCORRECT_INPUT_VALUES,
                                      f"ReplaceSessionKeys content unusable: {e}")) from None
        self.ppk_used = True
        self.state = "ppk"
        return pt

    def profile_segment(self, tlv86: bytes) -> bytes:
        """Open one 86; returns its chunk of the UPP (also appended to ``upp``)."""
        cmd = CMD_LOAD_PROFILE_ELEMENTS
        self._require(cmd, "metadata", "ppk", "profile")
        self._metadata_done(cmd)
        self.state = "profile"
        pt = self._unwrap(cmd, tlv86, 0x86, True)
        self.upp += pt
        return pt

    # -- ES10 command stream ---------------------------------------------------------
    @property
    def complete(self) -> bool:
        """The whole BF36 (with its A3) has been received and accepted."""
        return (self.state in ("profile", "metadata", "ppk") and self._bf36_left == 0
                and 0xA3 in self._seen)

    def _structure(self, msg: str) -> BppError:
        cmd = _CONTAINER_CMD.get(self._container, CMD_LOAD_PROFILE_ELEMENTS)
        return self._fail(BppError(cmd, ERR_SCP03T_STRUCTURE, msg))

    def _consume(self, n: int, *, in_container: bool) -> None:
        if self._bf36_left is None or n > self._bf36_left:
            raise self._structure("data beyond the end of BF36")
        self._bf36_left -= n
        if in_container:
            if n > self._container_left:
                raise self._structure(f"data beyond the end of {self._container:X}")
            self._container_left -= n

    def _close_container(self) -> None:
        if self._container is not None and self._container_left == 0:
            if self._container == 0xA1:
                self._metadata_done(CMD_STORE_METADATA)
            self._container = None

    def feed(self, command: bytes) -> list[BppEvent]:
        """Process one LoadBoundProfilePackage ES10 command (as ``split_bpp`` cuts them;
        whole A0..A3 TLVs or the whole BPP at once work too)."""
        if self.state == "failed":
            raise BppSequenceError(_CONTAINER_CMD.get(self._container, 0), "the BPP session already failed")
        buf = bytes(command)
        off = 0
        events: list[BppEvent] = []
        order = [0xA0, 0xA1, 0xA2, 0xA3]
        while off < len(buf):
            try:
                tag, length, voff = tlv.read_header(buf, off)
            except ProtocolError as e:
                raise self._structure(f"bad TLV header: {e}") from None
            if tag == TAG_BPP:
                if self._bf36_left is not None:
                    raise self._fail(BppSequenceError(0, "second BF36 in one session"))
                self._bf36_left = length
                off = voff
                continue
            if self._bf36_left is None:
                raise self._fail(BppSequenceError(0, f"command starts with {tag:X}, expected BF36"))
            if tag in order:
                if self._container is not None:
                    raise self._structure(f"{tag:X} inside {self._container:X}")
                last = self._seen[-1] if self._seen else None
                allowed = {0xA0: [None], 0xA1: [0xA0], 0xA2: [0xA1], 0xA3: [0xA1, 0xA2]}[tag]
                if last not in allowed or (tag == 0xA0 and self.state != "isdp"):
                    raise self._fail(BppSequenceError(_CONTAINER_CMD[tag], f"{tag:X} out of order"))
                if tag == 0xA1 and self.configure_isdp_request is None:
                    raise self._fail(BppSequenceError(CMD_CONFIGURE_ISDP, "A0 carried no ConfigureISDP 87"))
                self._consume(voff - off, in_container=False)
                self._seen.append(tag)
                self._container, self._container_left = tag, length
                if tag == 0xA1 and self.state == "isdp":
                    self.state = "metadata"
                off = voff
                self._close_container()
                continue
            try:
                t, end = tlv.parse_one(buf, off)
            except ProtocolError as e:
                raise self._structure(f"truncated TLV: {e}") from None
            self._consume(len(t.raw), in_container=self._container is not None)
            c = self._container
            if tag == TAG_ISC and c is None:
                self.initialise(t.raw)
                events.append(BppEvent(BPP_COMMAND_NAMES[0], None))
            elif tag == 0x87 and c == 0xA0:
                events.append(BppEvent(BPP_COMMAND_NAMES[1], self.configure_isdp(t.raw)))
            elif tag == 0x88 and c == 0xA1:
                md = self.store_metadata(t.raw)
                if md is not None:
                    events.append(BppEvent(BPP_COMMAND_NAMES[2], md))
            elif tag == 0x87 and c == 0xA2:
                events.append(BppEvent(BPP_COMMAND_NAMES[4], self.replace_session_keys(t.raw)))
            elif tag == 0x86 and c == 0xA3:
                events.append(BppEvent(BPP_COMMAND_NAMES[5], self.profile_segment(t.raw)))
            else:
                where = f"{c:X}" if c is not None else "BF36"
                raise self._structure(f"unexpected {tag:X} TLV in {where}")
            off = end
            self._close_container()
        if self._bf36_left == 0 and 0xA3 not in self._seen:
            raise self._fail(BppError(CMD_LOAD_PROFILE_ELEMENTS, ERR_SCP03T_STRUCTURE,
                                      "BF36 ended without A3 profile elements"))
        return events
