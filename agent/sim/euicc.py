"""Simulated SGP.22 eUICC: the ISO 7816-4 card layer (docs/protocol.md §1).

``SimEuicc.apdu(capdu) -> rapdu`` behaves like the card behind a modem's
AT+CSIM / AT+CGLA or a PC/SC reader:

* logical channels 0–19: MANAGE CHANNEL open (``00 70 00 00 01`` → ``ch 9000``)
  and close (``00 70 80 ch``); CLA carries the channel in b2–b1 for 0–3
  (``0x00``–``0x03``, ``0x80``–``0x83``) and as ``0x40 | (ch − 4)`` (``0xC0`` with the
  proprietary bit) for 4–19 (ISO 7816-4 §5.4.1);
* SELECT by DF name of the ISD-R (FCI ``6F`` template, SGP.22 §2.2.1.3 / docs/protocol.md §1.1);
* ES10 STORE DATA (GlobalPlatform: ``80|ch E2``, P1 ``11`` more blocks / ``91`` last
  block, P2 the block number from 00 for each ES10 command, Lc ≤ 255), reassembled
  and handed to the ISD-R (``isdr.Isdr``);
* response data: returned with ``9000`` when the command carries Le and the data
  fit Ne, otherwise ``61xx`` and GET RESPONSE (``00|ch C0 00 00 xx``) — the T=0 form
  an AT+CSIM modem sees, which is also what a command without Le gets;
* ISO status words for everything the card layer refuses.

Nothing escapes ``apdu()`` as a Python exception: a malformed command gets its
status word, and an internal fault gets ``6F00``.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

from ..errors import InputError, UsageError
from ..ids import iccid_to_bytes, make_eid, make_iccid
from .isdr import ISDR_AID, PROFILE_OVERHEAD, Isdr, SwError
from .state import DEFAULT_FREE_NVM, PROFILE_ENABLED, CardState, Identity, Profile, StateError, load_state
from ..logs import get_logger

log = get_logger(__name__)

MAX_CHANNELS = 20          # basic channel 0 plus 19 logical channels

INS_MANAGE_CHANNEL = 0x70
INS_SELECT = 0xA4
INS_GET_RESPONSE = 0xC0
INS_STORE_DATA = 0xE2
INS_STATUS = 0xF2
INS_READ_BINARY = 0xB0

SW_OK = 0x9000
SW_WRONG_LENGTH = 0x6700
SW_CHANNEL_NOT_SUPPORTED = 0x6881
SW_SM_NOT_SUPPORTED = 0x6882
SW_CHAINING_NOT_SUPPORTED = 0x6884
SW_CONDITIONS = 0x6985
SW_WRONG_DATA = 0x6A80
SW_FUNC_NOT_SUPPORTED = 0x6A81
SW_FILE_NOT_FOUND = 0x6A82
SW_WRONG_P1P2 = 0x6A86
SW_NOT_FOUND = 0x6A88
SW_INS_NOT_SUPPORTED = 0x6D00
SW_CLA_NOT_SUPPORTED = 0x6E00
SW_UNKNOWN = 0x6F00


def _sw(sw: int) -> bytes:
    return sw.to_bytes(2, "big")


@dataclass
class _Channel:
    selected: str | None = None          # "isdr" once the ISD-R is selected
    store_buf: bytearray = field(default_factory=bytearray)
    next_block: int | None = None        # expected P2 of the next STORE DATA block, None = idle
    pending: bytes = b""                 # response data waiting for GET RESPONSE


def _fcp(descriptor: int, fid: bytes, size: int | None) -> bytes:
    """File control parameters (ETSI TS 102 221 §11.1.1.3): descriptor, FID,
    life cycle (operational, activated) and, for an EF, its size."""
    body = bytes([0x82, 0x02, descriptor, 0x21]) + b"\x83\x02" + fid + b"\x8A\x01\x05"
    if size is not None:
        body += b"\x80\x02" + size.to_bytes(2, "big")
    return b"\x62" + bytes([len(body)]) + body


@dataclass
class _Apdu:
    cla: int
    ins: int
    p1: int
    p2: int
    data: bytes
    le: int | None                       # None = absent; otherwise Ne (1..256)


def _parse(capdu: bytes) -> _Apdu:
    """Short APDUs, cases 1–4 (ISO 7816-3 §12.1).  Extended length is not supported."""
    if len(capdu) < 4:
        raise SwError(SW_WRONG_LENGTH, "command shorter than a header")
    cla, ins, p1, p2 = capdu[:4]
    body = capdu[4:]
    if not body:
        return _Apdu(cla, ins, p1, p2, b"", None)
    if len(body) == 1:
        return _Apdu(cla, ins, p1, p2, b"", body[0] or 256)
    lc = body[0]
    if lc == 0:
        raise SwError(SW_WRONG_LENGTH, "extended-length APDUs are not supported")
    if len(body) == 1 + lc:
        return _Apdu(cla, ins, p1, p2, body[1:], None)
    if len(body) == 2 + lc:
        return _Apdu(cla, ins, p1, p2, body[1:1 + lc], body[-1] or 256)
    raise SwError(SW_WRONG_LENGTH, f"Lc {lc} does not match the {len(body) - 1} bytes that follow")


def decode_cla(cla: int) -> tuple[int, bool]:
    """Return (logical channel, proprietary class) or raise SwError (ISO 7816-4 §5.4.1)."""
    if cla == 0xFF:
        raise SwError(SW_CLA_NOT_SUPPORTED, "CLA FF is invalid")
    proprietary = bool(cla & 0x80)
    if cla & 0x40:
        # further interindustry: b6 secure messaging, b5 chaining, b4-b1 channel - 4
        if cla & 0x20:
            raise SwError(SW_SM_NOT_SUPPORTED, "secure messaging is not supported")
        if cla & 0x10:
            raise SwError(SW_CHAINING_NOT_SUPPORTED, "command chaining is not supported")
        return 4 + (cla & 0x0F), proprietary
    if cla & 0x20:
        # 0x20-0x3F / 0xA0-0xBF are RFU (0xA0 is the GSM 11.11 class)
        raise SwError(SW_CLA_NOT_SUPPORTED, f"CLA {cla:02X} is not supported")
    if cla & 0x10:
        raise SwError(SW_CHAINING_NOT_SUPPORTED, "command chaining is not supported")
    if cla & 0x0C:
        raise SwError(SW_SM_NOT_SUPPORTED, "secure messaging is not supported")
    return cla & 0x03, proprietary


class SimEuicc:
    """The simulated eUICC: ISO 7816-4 layer around the ISD-R."""

    def __init__(self, state: CardState):
        self.state = state
        self.isdr = Isdr(state)
        self._lock = threading.RLock()
        self._channels: dict[int, _Channel] = {0: _Channel()}
        #: optional callable(iccid | None) run after the enabled profile changed
        #: (a simulated modem can re-read the SIM, as after a REFRESH).
        self.on_profile_change = None
        self.isdr.on_profile_change = self._profile_changed
        self._state_lock = None          # StateLock while this process writes the state file

    # --- construction ---------------------------------------------------------
    @classmethod
    def open(cls, state_path, *, preload: int = 0, pki_dir=None, euicc_cert=None, euicc_key=None,
             eum_certs=(), ci_certs=(), free_nvm: int | None = None, lock: bool = False,
             read_only_if_busy: bool = False, iot: bool = False) -> "SimEuicc":
        """Load the card from ``state_path``, or create it there.

        A new card takes its identity from ``pki_dir`` (an eUICC certificate issued
        for a new EID by the EUM there; CI list = that CI), or from the given
        certificate/key files (DER or PEM; the EID is the certificate's subject
        serialNumber), or from a freshly generated CI → EUM → eUICC chain; then
        ``preload`` test profiles are installed (the first one enabled).  An existing
        card is loaded as it is: identity options and ``preload`` are ignored.

        ``iot``: an SGP.32 IoT eUICC (``"iot": true`` in the state file, sim/iot.py); an
        existing SGP.22 card given ``iot`` becomes one, and stays one.

        ``lock``: this process will write the card (``sim modem``, the CLI's ``--sim``): hold the
        state file's writer lock until ``close()``; another writer is refused (StateError
        ``sim_state_busy`` naming it). With ``read_only_if_busy`` a busy file is opened as a
        snapshot instead, for a command that only reads; saving it is refused."""
        from .state import StateLock, busy_error
        path = os.fspath(state_path)
        state_lock = None
        if lock and not os.path.isdir(path):
            state_lock = StateLock(path)
            try:
                state_lock.acquire()
            except StateError as e:
                if not (read_only_if_busy and e.code == "sim_state_busy" and os.path.exists(path)):
                    raise
                from ..pidlock import read_holder
                card = cls(load_state(path))
                card.state.busy = busy_error(path, read_holder(path + ".lock"), reading=True).message
                return card
        try:
            if os.path.exists(path):
                state = load_state(path)
                if iot and not state.iot:
                    state.iot = True
                    state.save()
                card = cls(state)
            else:
                state = _new_card(path, pki_dir=pki_dir, euicc_cert=euicc_cert, euicc_key=euicc_key,
                                  eum_certs=eum_certs, ci_certs=ci_certs, preload=preload, free_nvm=free_nvm)
                state.iot = iot
                state.save()
                card = cls(state)
        except BaseException:
            if state_lock is not None:
                state_lock.release()
            raise
        card._state_lock = state_lock
        return card

    def close(self) -> None:
        """Release the state file's writer lock (``open(..., lock=True)``); the card object
        stays usable in memory."""
        if self._state_lock is not None:
            self._state_lock.release()
            self._state_lock = None

    def warm(self) -> None:
        """Do the one-time work of a first download ahead of it: import the BPP code, load
        the ASN.1 tables, parse the card's key and certificates. ``sim modem`` runs this in
        the background at start, so the first download's card answers are as quick as later
        ones' (it changes nothing: the card works the same without it)."""
        from .. import asn1tables, codec, es8p  # noqa: F401
        from . import upp  # noqa: F401
        asn1tables.warm()
        ident = self.state.identity
        for name in ("euicc_key", "euicc_cert_der", "ci_certs"):
            getattr(ident, name)             # cached properties: parsed once, here
        ident.eum_cert_der()

    # --- public API (the modem, the CLI's --sim and the tests use it) ----------
    @property
    def eid(self) -> str:
        return self.state.eid

    def enabled_iccid(self) -> str | None:
        p = self.state.enabled_profile()
        return p.iccid if p else None

    def reset(self) -> None:
        """Card reset: logical channels closed, selections and download session dropped."""
        with self._lock:
            self._channels = {0: _Channel()}
            self.isdr.reset()

    def apdu(self, capdu: bytes) -> bytes:
        """One C-APDU in, one R-APDU (data + SW) out."""
        with self._lock:
            try:
                return self._apdu(bytes(capdu))
            except SwError as e:
                log.debug("APDU %s -> %04X (%s)", bytes(capdu).hex().upper(), e.sw, e)
                return _sw(e.sw)
            except StateError as e:
                log.error("simulated eUICC: %s", e.message)
                return _sw(SW_UNKNOWN)
            except Exception:  # never let the card layer raise into a transport
                log.exception("simulated eUICC internal error on APDU %s", bytes(capdu).hex().upper())
                return _sw(SW_UNKNOWN)

    # --- internals ----------------------------------------------------------------
    def _profile_changed(self) -> None:
        cb = self.on_profile_change
        if cb is not None:
            try:
                cb(self.enabled_iccid())
            except Exception:
                log.exception("on_profile_change callback failed")

    def _apdu(self, capdu: bytes) -> bytes:
        cmd = _parse(capdu)
        channel, proprietary = decode_cla(cmd.cla)
        ch = self._channels.get(channel)
        if ch is None:
            raise SwError(SW_CHANNEL_NOT_SUPPORTED, f"logical channel {channel} is not open")
        ins = cmd.ins
        if ins == INS_GET_RESPONSE:
            # Either class: GET RESPONSE may carry the CLA of the command whose data it
            # fetches (lpac, pySim and openpilot send 80/81 C0 after STORE DATA, and real
            # eUICCs answer it, e.g. the trace in lpac#92).
            return self._get_response(ch, cmd)
        # any other command discards response data not fetched yet (ISO 7816-4 §5.3.4)
        ch.pending = b""
        if ins == INS_MANAGE_CHANNEL:
            if proprietary:
                raise SwError(SW_CLA_NOT_SUPPORTED, "MANAGE CHANNEL uses the interindustry class")
            return self._manage_channel(channel, cmd)
        if ins == INS_SELECT:
            if proprietary:
                raise SwError(SW_CLA_NOT_SUPPORTED, "SELECT uses the interindustry class")
            return self._select(ch, cmd)
        if ins == INS_STORE_DATA:
            if not proprietary:
                raise SwError(SW_CLA_NOT_SUPPORTED, "STORE DATA uses the proprietary (GlobalPlatform) class")
            return self._store_data(ch, cmd)
        if ins == INS_READ_BINARY:
            if proprietary:
                raise SwError(SW_CLA_NOT_SUPPORTED, "READ BINARY uses the interindustry class")
            return self._read_binary(ch, cmd)
        if ins == INS_STATUS:
            if not proprietary:
                raise SwError(SW_CLA_NOT_SUPPORTED, "STATUS uses the proprietary class")
            return self._respond(ch, b"", cmd.le)
        raise SwError(SW_INS_NOT_SUPPORTED, f"INS {ins:02X} not supported")

    def _respond(self, ch: _Channel, data: bytes, le: int | None) -> bytes:
        """Data + 9000 when Le asks for at least that much, else 61xx (T=0 style)."""
        if not data:
            return _sw(SW_OK)
        if le is not None and len(data) <= le:
            return data + _sw(SW_OK)
        if le is not None:
            # T=1 style: the first Ne bytes now, the rest via GET RESPONSE
            first, rest = data[:le], data[le:]
            ch.pending = rest
            return first + _sw(0x6100 | (min(len(rest), 256) & 0xFF))
        ch.pending = data
        return _sw(0x6100 | (min(len(data), 256) & 0xFF))

    def _get_response(self, ch: _Channel, cmd: _Apdu) -> bytes:
        if cmd.p1 or cmd.p2:
            raise SwError(SW_WRONG_P1P2, "GET RESPONSE wants P1 = P2 = 00")
        if cmd.data:
            raise SwError(SW_WRONG_LENGTH, "GET RESPONSE carries no data")
        if not ch.pending:
            raise SwError(SW_CONDITIONS, "no response data available")
        ne = cmd.le or 256
        chunk, rest = ch.pending[:ne], ch.pending[ne:]
        ch.pending = rest
        if rest:
            return chunk + _sw(0x6100 | (min(len(rest), 256) & 0xFF))
        return chunk + _sw(SW_OK)

    def _manage_channel(self, channel: int, cmd: _Apdu) -> bytes:
        if cmd.data:
            raise SwError(SW_WRONG_LENGTH, "MANAGE CHANNEL carries no data")
        if cmd.p1 == 0x00:
            if cmd.le is None or cmd.le != 1:
                raise SwError(SW_WRONG_LENGTH, "MANAGE CHANNEL open expects Le = 01")
            if cmd.p2 != 0x00:
                # the terminal names the channel itself
                if not 1 <= cmd.p2 < MAX_CHANNELS:
                    raise SwError(SW_WRONG_P1P2, f"channel {cmd.p2} out of range")
                if cmd.p2 in self._channels:
                    raise SwError(SW_CONDITIONS, f"channel {cmd.p2} is already open")
                new = cmd.p2
            else:
                free = [n for n in range(1, MAX_CHANNELS) if n not in self._channels]
                if not free:
                    raise SwError(SW_FUNC_NOT_SUPPORTED, "no logical channel left")
                new = free[0]
            self._channels[new] = _Channel()
            return bytes([new]) + _sw(SW_OK)
        if cmd.p1 == 0x80:
            # "00 70 80 ch" and "00 70 80 ch 00" (Le 00, as lpac sends it) both close
            if cmd.le not in (None, 256):
                raise SwError(SW_WRONG_LENGTH, "MANAGE CHANNEL close returns no data")
            target = cmd.p2 if cmd.p2 else channel
            if target == 0:
                raise SwError(SW_WRONG_P1P2, "the basic channel cannot be closed")
            if target >= MAX_CHANNELS:
                raise SwError(SW_WRONG_P1P2, f"channel {target} out of range")
            if target not in self._channels:
                raise SwError(SW_CHANNEL_NOT_SUPPORTED, f"channel {target} is not open")
            del self._channels[target]
            return _sw(SW_OK)
        raise SwError(SW_WRONG_P1P2, f"MANAGE CHANNEL P1 {cmd.p1:02X} not supported")

    def _select_file(self, ch: _Channel, cmd: _Apdu) -> bytes:
        """A minimal UICC file system: the MF and EF.ICCID (ETSI TS 102 221 §13.2).

        Every eUICC is a UICC; tools probe SELECT MF to identify the card and read
        EF.ICCID, which holds the enabled profile's ICCID."""
        fid = cmd.data
        if cmd.p1 in (0x08, 0x09):                    # path from the MF (08) or current DF (09)
            fid = fid[2:] if fid[:2] == b"\x3F\x00" else fid
        if fid in (b"", b"\x3F\x00"):
            ch.selected, fcp = "mf", _fcp(0x78, b"\x3F\x00", None)
        elif fid == b"\x2F\xE2":
            if self.enabled_iccid() is None:
                raise SwError(SW_FILE_NOT_FOUND, "no enabled profile: no EF.ICCID")
            ch.selected, fcp = "ef_iccid", _fcp(0x41, b"\x2F\xE2", 10)
        else:
            raise SwError(SW_FILE_NOT_FOUND, f"file {fid.hex().upper()} not found")
        ch.store_buf.clear()
        ch.next_block = None
        if cmd.p2 & 0x0C == 0x0C:
            return _sw(SW_OK)
        return self._respond(ch, fcp, cmd.le)

    def _read_binary(self, ch: _Channel, cmd: _Apdu) -> bytes:
        if ch.selected != "ef_iccid":
            raise SwError(SW_CONDITIONS, "READ BINARY needs a transparent EF selected")
        iccid = self.enabled_iccid()
        if iccid is None:
            raise SwError(SW_FILE_NOT_FOUND, "no enabled profile")
        data = iccid_to_bytes(iccid)
        off = (cmd.p1 << 8) | cmd.p2
        if off > len(data):
            raise SwError(SW_WRONG_P1P2, "offset beyond the end of the file")
        n = len(data) - off if not cmd.le else min(cmd.le, len(data) - off)
        return data[off:off + n] + _sw(SW_OK)

    def _select(self, ch: _Channel, cmd: _Apdu) -> bytes:
        if cmd.p1 in (0x00, 0x08, 0x09):
            return self._select_file(ch, cmd)
        if cmd.p1 != 0x04:
            raise SwError(SW_WRONG_P1P2, f"SELECT P1 {cmd.p1:02X} not supported")
        if cmd.p2 & ~0x0C & 0xFF not in (0x00,):
            raise SwError(SW_WRONG_P1P2, f"SELECT P2 {cmd.p2:02X} not supported")
        aid = cmd.data
        if not 5 <= len(aid) <= 16:
            raise SwError(SW_WRONG_LENGTH if not aid else SW_WRONG_DATA, "AID must be 5 to 16 bytes")
        # right-truncated AIDs select too (ISO 7816-4 §8.2.2.2)
        if not ISDR_AID.startswith(aid):
            ch.selected = None
            ch.store_buf.clear()
            ch.next_block = None
            raise SwError(SW_NOT_FOUND, f"no application {aid.hex().upper()}")
        ch.selected = "isdr"
        ch.store_buf.clear()
        ch.next_block = None
        if cmd.p2 & 0x0C == 0x0C:
            return _sw(SW_OK)            # no response data requested
        return self._respond(ch, self.isdr.fci(), cmd.le)

    def _store_data(self, ch: _Channel, cmd: _Apdu) -> bytes:
        if ch.selected != "isdr":
            raise SwError(SW_CONDITIONS, "STORE DATA before SELECT of the ISD-R on this channel")
        if cmd.p1 not in (0x11, 0x91):
            ch.store_buf.clear()
            ch.next_block = None
            raise SwError(SW_WRONG_P1P2, f"STORE DATA P1 {cmd.p1:02X}: ES10 uses 11 (more blocks) or 91 (last)")
        if not cmd.data:
            raise SwError(SW_WRONG_LENGTH, "STORE DATA without data")
        if cmd.p2 == 0:
            # block 00 always starts a new ES10 command (an aborted one is dropped)
            ch.store_buf.clear()
        elif ch.next_block is None or cmd.p2 != ch.next_block:
            expected = "00" if ch.next_block is None else f"{ch.next_block:02X}"
            ch.store_buf.clear()
            ch.next_block = None
            raise SwError(SW_WRONG_P1P2, f"STORE DATA block number {cmd.p2:02X}, expected {expected}")
        ch.store_buf += cmd.data
        if cmd.p1 == 0x11:
            if cmd.p2 == 0xFF:
                ch.store_buf.clear()
                ch.next_block = None
                raise SwError(SW_WRONG_P1P2, "more than 256 STORE DATA blocks")
            ch.next_block = cmd.p2 + 1
            return _sw(SW_OK)
        request = bytes(ch.store_buf)
        ch.store_buf.clear()
        ch.next_block = None
        response = self.isdr.handle(request)
        return self._respond(ch, response, cmd.le)


# --- card manufacturing ---------------------------------------------------------------

#: where preloaded test profiles send their enable/disable/delete notifications
PRELOAD_NOTIFICATION_ADDRESS = "smdp.example.com"
PRELOAD_SPN = "esim-agent test"
PRELOAD_PROFILE_SIZE = 14 * 1024
# MCC 001 / MNC 01, the ITU test network, as 3 bytes of swapped BCD (TS 24.008): 00 F1 10
PRELOAD_OWNER = {"mcc_mnc": "00F110"}


def random_eid_body(prefix: str = "") -> str:
    """30 digits for an EID: 89 + country 049 + issuer 032 + platform/version digits +
    random individual digits (docs/protocol.md §8.2), or ``prefix`` + random digits."""
    base = prefix or "89049032" + "0010020000"
    if len(base) > 30 or not base.isdigit():
        raise InputError(f"EID prefix {prefix!r} must be at most 30 digits", code="bad_eid")
    import secrets      # here: ~8 ms (hashlib, random) that opening an existing card never needs
    return base + "".join(secrets.choice("0123456789") for _ in range(30 - len(base)))


def _read(path, what: str) -> bytes:
    try:
        with open(os.fspath(path), "rb") as f:
            return f.read()
    except OSError as e:
        raise InputError(f"cannot read the {what} {path}: {e.strerror or e}", code="bad_file") from None


def _eum_eid_prefix(eum_cert) -> str:
    """The EID prefix an EUM's nameConstraints permit (directoryName serialNumber), or ""."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID
    try:
        nc = eum_cert.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return ""
    for gn in nc.permitted_subtrees or []:
        if isinstance(gn, x509.DirectoryName):
            for a in gn.value.get_attributes_for_oid(NameOID.SERIAL_NUMBER):
                if str(a.value).isdigit() and len(str(a.value)) <= 30:
                    return str(a.value)
    return ""


def _new_identity(*, pki_dir, euicc_cert, euicc_key, eum_certs, ci_certs) -> tuple[str, Identity]:
    """EID and identity of a new card (for SimEuicc.open)."""
    from .. import crypto
    from . import pki

    extra_eums = [c for p in eum_certs for c in crypto.load_certs(_read(p, "EUM certificate"))]
    extra_cis = [c for p in ci_certs for c in crypto.load_certs(_read(p, "CI certificate"))]
    if euicc_cert or euicc_key:
        if not (euicc_cert and euicc_key):
            raise UsageError("an eUICC certificate and its private key go together", code="bad_usage")
        cert = crypto.load_cert(_read(euicc_cert, "eUICC certificate"))
        key = crypto.load_key(_read(euicc_key, "eUICC private key"))
        if crypto.public_point(key) != crypto.public_point(cert):
            raise InputError(f"{euicc_key} is not the private key of {euicc_cert}", code="key_mismatch")
        eid = crypto.eid_of(cert) or ""
        if not (len(eid) == 32 and eid.isdigit()):
            raise InputError(f"the eUICC certificate's subject serialNumber {eid!r} is not a 32-digit EID",
                             code="bad_eid")
        eums, cis = extra_eums, extra_cis
        if not eums:
            raise UsageError("an eUICC certificate needs the EUM certificate that issued it (--eum-cert)",
                             code="bad_usage")
    else:
        if pki_dir:
            p = pki.load_pki(pki_dir, require_keys=False)
            if p.eum.key is None:
                raise InputError(f"the PKI directory {pki_dir} has no EUM private key (eum.key.pem)",
                                 code="pki_missing")
            ci, eum = p.ci, p.eum
        else:
            ci, eum = pki.new_ci_and_eum()
        eid = make_eid(random_eid_body(_eum_eid_prefix(eum.cert)))
        issued = pki.issue_euicc(eum, eid)
        cert, key = issued.cert, issued.key
        eums, cis = [eum.cert] + extra_eums, [ci.cert] + extra_cis
    issuer = next((e for e in eums if e.subject == cert.issuer), None)
    signing = [crypto.aki(issuer).hex().upper()] if issuer is not None and crypto.aki(issuer) else []
    verification: list[str] = []
    for c in cis:
        k = crypto.ski(c)
        if k is not None and k.hex().upper() not in verification:
            verification.append(k.hex().upper())
    ident = Identity(
        euicc_cert_pem=crypto.cert_pem(cert).decode(), euicc_key_pem=crypto.key_pem(key).decode(),
        eum_certs_pem=[crypto.cert_pem(c).decode() for c in eums],
        ci_certs_pem=[crypto.cert_pem(c).decode() for c in cis],
        ci_pkids_signing=signing, ci_pkids_verification=verification)
    return eid, ident


def preload_profiles(state: CardState, count: int) -> None:
    """Install ``count`` test profiles as if downloaded at the factory: ICCIDs 8949… with a
    Luhn digit (unique per card: they embed part of the EID), the first one enabled,
    notifications for enable/disable/delete going to smdp.example.com."""
    for i in range(1, count + 1):
        iccid = make_iccid("8949" + state.eid[18:26], len(state.profiles) + 1, 19)
        while state.find_iccid(iccid) is not None:
            iccid = make_iccid("8949" + state.eid[18:26], len(state.profiles) + 1 + i * 1000, 19)
        p = Profile(
            iccid=iccid, isdp_aid=state.take_isdp_aid(), profile_class=2,
            service_provider_name=PRELOAD_SPN, profile_name=f"Test Profile {i}",
            nci=[{"ops": [1, 2, 3], "address": PRELOAD_NOTIFICATION_ADDRESS}],
            owner=dict(PRELOAD_OWNER), imsi=f"00101{state.eid[-10:-2]}{i:02d}",
            size=PRELOAD_PROFILE_SIZE + PROFILE_OVERHEAD)
        if state.enabled_profile() is None:
            p.state = PROFILE_ENABLED
        state.profiles.append(p)
        state.free_nvm -= p.size


def _new_card(path, *, pki_dir=None, euicc_cert=None, euicc_key=None, eum_certs=(), ci_certs=(),
              preload: int = 0, free_nvm: int | None = None) -> CardState:
    if preload < 0:
        raise UsageError("preload must be 0 or more profiles", code="bad_usage")
    eid, ident = _new_identity(pki_dir=pki_dir, euicc_cert=euicc_cert, euicc_key=euicc_key,
                               eum_certs=eum_certs, ci_certs=ci_certs)
    state = CardState(eid=eid, identity=ident, free_nvm=DEFAULT_FREE_NVM if free_nvm is None else free_nvm,
                      path=path)
    preload_profiles(state, preload)
    return state


__all__ = ["SimEuicc", "decode_cla", "preload_profiles", "random_eid_body"]
