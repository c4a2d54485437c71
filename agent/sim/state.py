"""Persistent state of the simulated eUICC: one JSON file (DESIGN.md "Simulator
state ... lives in one file, so a simulated card survives restarts like a real one").

Holds the EID, the card's identity (eUICC key and certificate, EUM and CI
certificates, all PEM), the installed profiles, the pending notifications (each
with the exact signed DER the eUICC produced, docs/protocol.md §6), the counters,
the configured addresses (SGP.22 ES10a), the free-NVM budget and the stored
one-time ECKA key pair kept for a BPP retry (docs/protocol.md §4.3).

An IoT card (``"iot": true``, SGP.32, docs/protocol.md §7) also keeps its eIM
associations (``eims``: configuration DER, public key, last counter, association
token), the immediate-enable configuration, the pending rollback and fallback
return points and, among the notifications, its signed eUICC Package Results.
Every one of these keys is optional on load, so a file written before them still opens.

The file is written atomically after every change (temporary file in the same
directory, fsync, rename).  One process writes it at a time: a writer (``sim modem``,
the CLI's ``--sim``) holds ``STATE.lock`` (``StateLock``) while it has the card open, so a
second writer is refused with a message naming the first instead of silently overwriting
its changes; a reader beside a writer gets a snapshot that refuses to be saved.  Loading parses JSON only: keys and certificates
stay PEM text until a signature is needed (``Identity``), so opening a card
for a read-only command is cheap.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property

from ..errors import AgentError

STATE_VERSION = 1

#: GSMA root SM-DS (docs/protocol.md §3.9); every eUICC is configured with it.
DEFAULT_ROOT_DS = "lpa.ds.gsma.com"
#: Free non-volatile memory of a new card, in bytes (reported in EUICCInfo2 extCardResource).
DEFAULT_FREE_NVM = 512 * 1024
#: ISD-P AIDs are vendor-assigned; we follow the common A0000005591010FFFFFFFF89 0000 nn 00 pattern.
ISDP_AID_PREFIX = "A0000005591010FFFFFFFF890000"
FIRST_ISDP_INDEX = 0x10

PROFILE_ENABLED = "enabled"
PROFILE_DISABLED = "disabled"


class StateError(AgentError):
    """The simulated eUICC's state file cannot be used."""

    code = "sim_state_error"
    exit_code = 2


@dataclass
class Profile:
    """One installed profile (SGP.22 ProfileInfo, docs/protocol.md §8.1)."""

    iccid: str
    isdp_aid: str                         # hex, 16 bytes
    state: str = PROFILE_DISABLED         # "enabled" | "disabled"
    profile_class: int = 2                # 0 test, 1 provisioning, 2 operational
    service_provider_name: str = ""
    profile_name: str = ""
    nickname: str | None = None
    icon_type: int | None = None          # 0 jpg, 1 png
    icon: str | None = None               # hex
    ppr: list[int] = field(default_factory=list)          # profilePolicyRules bit numbers
    # notificationConfigurationInfo: [{"ops": [bit numbers], "address": fqdn}]
    nci: list[dict] = field(default_factory=list)
    owner: dict | None = None             # {"mcc_mnc": hex, "gid1": hex?, "gid2": hex?}
    dp_oid: str | None = None             # dpProprietaryData.dpOid
    smdp_oid: str | None = None           # SM-DP+ that installed it (None: preloaded)
    smdp_address: str | None = None
    imsi: str | None = None
    size: int = 0                         # NVM bytes it occupies
    fallback: bool = False                # SGP.32 fallbackAttribute (9F26): the Fallback Profile
    fallback_allowed: bool | None = None  # SGP.32 fallbackAllowed (9F67), set by the Profile Owner

    @property
    def enabled(self) -> bool:
        return self.state == PROFILE_ENABLED

    def notify_addresses(self, op_bit: int) -> list[str]:
        """Addresses whose NCI entry lists the operation bit (docs/protocol.md §6.1)."""
        return [e["address"] for e in self.nci if op_bit in e.get("ops", [])]


#: Notification.operation of a kept eUICC Package Result (SGP.32 §2.11.2.1): not an SGP.22
#: notification, so ListNotification and an unfiltered RetrieveNotificationsList skip it.
EPR_OPERATION = "euiccPackageResult"


@dataclass
class Notification:
    """A pending notification: its metadata, for ListNotification, and the exact
    signed PendingNotification DER (BF37 or 30) for RetrieveNotificationsList.
    On an IoT card also a signed eUICC Package Result (BF51, ``EPR_OPERATION``,
    ``address`` = the eIM's id) kept until RemoveNotificationFromList."""

    seq: int
    operation: str            # install | enable | disable | delete | euiccPackageResult
    address: str
    iccid: str | None
    der: str                  # hex

    @property
    def der_bytes(self) -> bytes:
        return bytes.fromhex(self.der)


@dataclass
class Identity:
    """The card's certificates and key as PEM text, parsed on first use."""

    euicc_cert_pem: str
    euicc_key_pem: str
    eum_certs_pem: list[str]
    ci_certs_pem: list[str]
    ci_pkids_signing: list[str]          # hex SKIs: CIs above our own chain (EUICCInfo1/2)
    ci_pkids_verification: list[str]     # hex SKIs of the CIs we can verify servers with

    @cached_property
    def euicc_key(self):
        from .. import crypto
        return crypto.load_key(self.euicc_key_pem)

    @cached_property
    def euicc_cert(self):
        from .. import crypto
        return crypto.load_cert(self.euicc_cert_pem)

    @cached_property
    def euicc_cert_der(self) -> bytes:
        from .. import crypto
        return crypto.cert_der(self.euicc_cert)

    @cached_property
    def eum_certs(self) -> list:
        from .. import crypto
        return [crypto.load_cert(p) for p in self.eum_certs_pem]

    @cached_property
    def ci_certs(self) -> list:
        from .. import crypto
        return [crypto.load_cert(p) for p in self.ci_certs_pem]

    def eum_cert_der(self) -> bytes:
        """CERT.EUM: the EUM that issued our eUICC certificate (first one otherwise)."""
        from .. import crypto
        cert = self.euicc_cert
        for eum in self.eum_certs:
            if cert.issuer == eum.subject:
                return crypto.cert_der(eum)
        if not self.eum_certs:
            raise StateError("the simulated eUICC has no EUM certificate", code="sim_no_eum")
        return crypto.cert_der(self.eum_certs[0])

    def ci_cert(self, pkid: bytes):
        """The CI certificate whose SKI is ``pkid``, or None."""
        from .. import crypto
        for ci in self.ci_certs:
            if crypto.ski(ci) == pkid:
                return ci
        return None

    def to_json(self) -> dict:
        return {"euicc_cert": self.euicc_cert_pem, "euicc_key": self.euicc_key_pem,
                "eum_certs": list(self.eum_certs_pem), "ci_certs": list(self.ci_certs_pem),
                "ci_pkids_signing": list(self.ci_pkids_signing),
                "ci_pkids_verification": list(self.ci_pkids_verification)}

    @classmethod
    def from_json(cls, d: dict) -> "Identity":
        return cls(d["euicc_cert"], d["euicc_key"], list(d.get("eum_certs", [])), list(d.get("ci_certs", [])),
                   list(d.get("ci_pkids_signing", [])), list(d.get("ci_pkids_verification", [])))


@dataclass
class EimEntry:
    """One associated eIM (SGP.32 §2.11.1.1.1): its EimConfigurationData as stored (hex DER,
    with the association token this card assigned), the key that verifies its packages
    (SPKI PEM), the last counter value accepted from it and its association token."""

    eim_id: str
    config: str                           # hex DER of EimConfigurationData
    public_key: str | None = None         # PEM SubjectPublicKeyInfo
    counter: int = 0                      # last accepted counterValue
    association_token: int | None = None

    @property
    def config_der(self) -> bytes:
        return bytes.fromhex(self.config)


@dataclass
class CardState:
    """Everything the simulated eUICC remembers across power cycles."""

    eid: str
    identity: Identity
    profiles: list[Profile] = field(default_factory=list)
    notifications: list[Notification] = field(default_factory=list)
    next_seq: int = 1
    next_isdp: int = FIRST_ISDP_INDEX
    default_dp_address: str | None = None
    root_ds_address: str = DEFAULT_ROOT_DS
    free_nvm: int = DEFAULT_FREE_NVM
    # One-time ECKA key pair kept for a retry/rebind: {"otsk": PEM, "otpk": hex}
    ot_key: dict | None = None
    # --- SGP.32 (IoT) ---
    iot: bool = False
    #: ESipa/ESep version whose EPR signature input the card uses: "1.2" (also 1.1) or "1.0"
    esipa_version: str = "1.2"
    eims: list[EimEntry] = field(default_factory=list)
    next_association_token: int = 1
    #: ConfigureImmediateProfileEnabling: {"flag": bool, "smdp_oid": str?, "smdp_address": str?}
    immediate_enable: dict | None = None
    #: ICCID of the profile just downloaded, which ImmediateEnable may enable
    immediate_candidate: str | None = None
    #: one allowed ProfileRollback: {"iccid": enabled, "previous": ICCID or None, "seq": EPR seq, "index": n}
    rollback: dict | None = None
    #: ExecuteFallbackMechanism done: {"fallback": ICCID, "previous": ICCID or None} for ReturnFromFallback
    fallback_return: dict | None = None
    path: str | None = field(default=None, repr=False, compare=False)
    # Set on a read-only snapshot of a file another process writes: why it must not be saved.
    busy: str | None = field(default=None, repr=False, compare=False)

    # --- queries ------------------------------------------------------------
    def find_iccid(self, iccid: str) -> Profile | None:
        return next((p for p in self.profiles if p.iccid == iccid), None)

    def find_aid(self, aid_hex: str) -> Profile | None:
        aid_hex = aid_hex.upper()
        return next((p for p in self.profiles if p.isdp_aid.upper() == aid_hex), None)

    def enabled_profile(self) -> Profile | None:
        return next((p for p in self.profiles if p.enabled), None)

    def find_eim(self, eim_id: str) -> EimEntry | None:
        return next((e for e in self.eims if e.eim_id == eim_id), None)

    def fallback_profile(self) -> Profile | None:
        return next((p for p in self.profiles if p.fallback), None)

    # --- allocators -----------------------------------------------------------
    def take_seq(self) -> int:
        """eUICC-wide, strictly increasing notification sequence number (docs/protocol.md §6.1)."""
        n = self.next_seq
        self.next_seq += 1
        return n

    def take_isdp_aid(self) -> str:
        while True:
            n = self.next_isdp
            self.next_isdp += 1
            # the index byte wraps after FF into the preceding byte of the AID
            aid = f"{ISDP_AID_PREFIX[:-4]}{n:06X}00"
            if len(aid) != 32:
                raise StateError("no ISD-P AIDs left on the simulated eUICC", code="sim_full")
            if self.find_aid(aid) is None:
                return aid

    # --- persistence ----------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "version": STATE_VERSION,
            "eid": self.eid,
            "identity": self.identity.to_json(),
            "profiles": [asdict(p) for p in self.profiles],
            "notifications": [asdict(n) for n in self.notifications],
            "next_seq": self.next_seq,
            "next_isdp": self.next_isdp,
            "default_dp_address": self.default_dp_address,
            "root_ds_address": self.root_ds_address,
            "free_nvm": self.free_nvm,
            "ot_key": self.ot_key,
            "iot": self.iot,
            "esipa_version": self.esipa_version,
            "eims": [asdict(e) for e in self.eims],
            "next_association_token": self.next_association_token,
            "immediate_enable": self.immediate_enable,
            "immediate_candidate": self.immediate_candidate,
            "rollback": self.rollback,
            "fallback_return": self.fallback_return,
        }

    @classmethod
    def from_json(cls, d: dict, path: str | None = None) -> "CardState":
        if not isinstance(d, dict):
            raise ValueError("top level is not a JSON object")
        if d.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported state version {d.get('version')!r} (this build reads {STATE_VERSION})")
        eid = d["eid"]
        if not (isinstance(eid, str) and len(eid) == 32 and eid.isdigit()):
            raise ValueError(f"EID {eid!r} is not 32 digits")
        st = cls(
            eid=eid,
            identity=Identity.from_json(d["identity"]),
            profiles=[Profile(**_known(Profile, p)) for p in d.get("profiles", [])],
            notifications=[Notification(**_known(Notification, n)) for n in d.get("notifications", [])],
            next_seq=int(d.get("next_seq", 1)),
            next_isdp=int(d.get("next_isdp", FIRST_ISDP_INDEX)),
            default_dp_address=d.get("default_dp_address"),
            root_ds_address=d.get("root_ds_address", DEFAULT_ROOT_DS),
            free_nvm=int(d.get("free_nvm", DEFAULT_FREE_NVM)),
            ot_key=d.get("ot_key"),
            iot=bool(d.get("iot", False)),
            esipa_version=str(d.get("esipa_version", "1.2")),
            eims=[EimEntry(**_known(EimEntry, e)) for e in d.get("eims", [])],
            next_association_token=int(d.get("next_association_token", 1)),
            immediate_enable=d.get("immediate_enable"),
            immediate_candidate=d.get("immediate_candidate"),
            rollback=d.get("rollback"),
            fallback_return=d.get("fallback_return"),
            path=path,
        )
        if st.esipa_version not in ("1.2", "1.1", "1.0"):
            raise ValueError(f"esipa_version {st.esipa_version!r} is not 1.0, 1.1 or 1.2")
        for e in st.eims:
            bytes.fromhex(e.config)
        if sum(1 for p in st.profiles if p.enabled) > 1:
            raise ValueError("more than one profile is enabled")
        for n in st.notifications:
            bytes.fromhex(n.der)
        return st

    def save(self) -> None:
        """Write the whole state atomically: tmp file + fsync + rename (+ directory fsync)."""
        if not self.path:
            return
        if self.busy:
            raise StateError(self.busy, code="sim_state_busy")
        text = json.dumps(self.to_json(), indent=1)
        d = os.path.dirname(os.path.abspath(self.path))
        tmp = os.path.join(d, f".{os.path.basename(self.path)}.tmp{os.getpid()}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, text.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            try:
                dfd = os.open(d, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            except OSError:
                pass  # some filesystems refuse a directory fsync; the rename is done anyway
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise StateError(f"cannot write the simulated eUICC state {self.path}: {e.strerror or e}",
                             code="sim_state_write") from None


class StateLock:
    """The state file's writer lock: ``STATE.lock`` beside it (agent.pidlock), held while a
    process has the card open for writing. ``acquire`` raises StateError ``sim_state_busy``
    naming the holder."""

    def __init__(self, path):
        from ..pidlock import PidLock
        self.path = os.fspath(path)
        self._lock = PidLock(self.path + ".lock")

    def acquire(self) -> "StateLock":
        from ..pidlock import Busy
        try:
            self._lock.acquire()
        except Busy as e:
            raise busy_error(self.path, e.holder) from None
        except OSError:
            pass      # no lock file possible (read-only directory): nothing can be saved there either
        return self

    def release(self) -> None:
        self._lock.release()


def busy_error(path: str, holder, *, reading: bool = False) -> StateError:
    who = holder.shown() if holder is not None else "another process"
    if reading:
        msg = (f"the simulated eUICC state {path} is in use by {who}: this command only reads it and must not "
               "change it")
    else:
        via = (" through the simulated modem that holds it (--device with its --link)"
               if holder is not None and holder.command == "sim modem" else "")
        msg = (f"the simulated eUICC state {path} is in use by {who}; one process writes a card at a time, or "
               f"changes get lost: use the card{via or ' through that process'}, or stop it first "
               "(with a simulated modem: --device LINK instead of --sim)")
    return StateError(msg, code="sim_state_busy",
                      details={"pid": holder.pid} if holder is not None else {})


def _known(cls, d: dict) -> dict:
    """Only the fields this build knows (a newer build may have added some)."""
    if not isinstance(d, dict):
        raise ValueError(f"a {cls.__name__.lower()} entry is not a JSON object")
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


def load_state(path) -> CardState:
    """Read a state file; a missing, unreadable or corrupt file raises StateError."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise StateError(f"cannot read the simulated eUICC state {path}: {e.strerror or e}",
                         code="sim_state_unreadable") from None
    try:
        return CardState.from_json(json.loads(raw.decode("utf-8")), path=path)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
        raise StateError(f"the simulated eUICC state {path} is corrupt ({what}); "
                         "restore it or delete it to create a new card", code="sim_state_corrupt") from None
